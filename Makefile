# asyncnode — run `make` for the list of targets.
GO      ?= go
BIN     ?= bin/asyncnode
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)

.DEFAULT_GOAL := help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build bin/asyncnode
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/asyncnode

demo: build ## throwaway PostgreSQL + one node; prints how to connect with psql (Ctrl-C stops)
	./$(BIN) dev

demo3: build ## same with a 3-node cluster
	./$(BIN) dev --nodes 3

test: ## all tests (real PostgreSQL, real Raft), with the race detector
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1)
	$(GO) test -race -timeout 40m ./...
	cd tools/riverbench && $(GO) vet . && $(GO) test -race -timeout 10m .

failover: ## failover figures: kill -9 the leader of a 3-node cluster 10 times under load (no -race)
	@out=$$(mktemp); ASYNCNODE_FAILOVER_ROUNDS=$${ROUNDS:-10} $(GO) test -count=1 -v -timeout 30m -run TestFailoverFigures ./cmd/asyncnode/ > $$out 2>&1; rc=$$?; \
	grep -E '^(failover|---|ok|FAIL)' $$out; [ $$rc -eq 0 ] || tail -50 $$out; rm -f $$out; exit $$rc

test-faults: ## fault-injection suite (kill, freeze, restart, black-hole, partitions: needs root) under load, one summary line per scenario (no -race; SOAK=1 long tier, ROUNDS=N)
	@out=$$(mktemp); ASYNCNODE_FAULT_PARTITIONS=1 ASYNCNODE_FAULT_SOAK=$${SOAK:-} ASYNCNODE_FAULT_ROUNDS=$${ROUNDS:-} $(GO) test -count=1 -v -timeout 60m -run 'TestFault' ./cmd/asyncnode/ > $$out 2>&1; rc=$$?; \
	grep -E '^(scenario=|--- |ok|FAIL)' $$out; \
	if [ $$rc -ne 0 ]; then grep -E -A20 'violations:|Error Trace:' $$out | grep -v '^\s*$$' | head -120; \
	  mkdir -p bin; cp $$out bin/test-faults.log; echo "full output, node logs included: bin/test-faults.log"; fi; \
	rm -f $$out; exit $$rc

bench-river: ## River (a Go + PostgreSQL job queue) on a throwaway PostgreSQL, to read asyncnode bench beside (a module of its own: downloads River)
	cd tools/riverbench && $(GO) run . $(ARGS)

lint: ## gofmt + go vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || (gofmt -l $$(git ls-files '*.go'); exit 1)
	$(GO) vet ./...
	cd tools/riverbench && $(GO) vet .

clean: ## remove build output
	rm -rf bin

.PHONY: help build demo demo3 test failover test-faults bench-river lint clean
