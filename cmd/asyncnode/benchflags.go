package main

import (
	"flag"
	"io"
	"slices"
	"strings"
)

// refusedNodeFlag says why bench does not take the `run` flag name in
// --node-flag, or "" if it does: bench sets some itself (those
// localNodeArgs gives a node that joins), and it reaches its nodes' API
// over plain HTTP without a token.
func refusedNodeFlag(name string) string {
	sets := slices.Contains(localNodeArgs("", "", "node2", [3]string{}, 3, "", "join"), "--"+name)
	switch {
	case name == "dsn" && sets:
		return "bench sets --dsn for its nodes itself; use --bench-dsn"
	case name == "log-level" && sets:
		return "bench sets --log-level for its nodes itself; use bench's --log-level"
	case sets:
		return "bench sets --" + name + " for its nodes itself"
	case name == "tls-cert", name == "tls-key", name == "tls-ca", name == "token":
		return "bench reaches its nodes' API over plain HTTP without a token, so it cannot run them with --" + name
	}
	return ""
}

// shownNodeArgs is args (nodeRunArgs's) as bench prints them: the value of
// a secret masked as connection strings' passwords are.
func shownNodeArgs(args []string) []string {
	shown := slices.Clone(args)
	for i, a := range shown {
		if strings.HasPrefix(a, "--gossip-key=") {
			shown[i] = "--gossip-key=xxxxx"
		}
	}
	return shown
}

// nodeRunArgs turns bench's --node-flag values (name=value, the name with
// or without leading dashes) into `asyncnode run` arguments for every node
// bench starts. Each name must be a flag of `run` that bench does not set
// itself, each value must parse, and together they must pass run's own
// checks (ranges, flags that go together), so that a mistake is reported
// in one line before bench starts anything rather than as a node that
// exits during the run.
func nodeRunArgs(items []string) ([]string, error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var rf runFlags
	rf.register(fs)
	var args []string
	for _, it := range items {
		name, value, ok := strings.Cut(strings.TrimLeft(it, "-"), "=")
		if !ok || name == "" {
			return nil, usagef("--node-flag %q: give it as name=value, e.g. target-long-after=200ms", it)
		}
		f := fs.Lookup(name)
		if f == nil {
			return nil, usagef("--node-flag %q: asyncnode run has no flag --%s", name, name)
		}
		if why := refusedNodeFlag(name); why != "" {
			return nil, usagef("--node-flag %q: %s", name, why)
		}
		if err := f.Value.Set(value); err != nil {
			// Only typed flags fail here; the secrets are strings.
			return nil, usagef("--node-flag %q: invalid value for --%s: %v", name+"="+value, name, err)
		}
		args = append(args, "--"+name+"="+value)
	}
	// What bench sets itself, so that run's checks see a whole command line.
	rf.nodeID, rf.dataDir, rf.dsn = "node1", "node1", "host=127.0.0.1"
	if _, err := rf.validate(); err != nil {
		return nil, usagef("--node-flag: %v", err)
	}
	return args, nil
}

// nodeArgs is what bench adds to every node's command line, extra (its
// own flags for one cluster) last: the last of a repeated flag wins.
func (b *bench) nodeArgs(extra ...string) []string {
	args := slices.Clone(b.nodeFlagArgs)
	if b.f.profileSeconds > 0 {
		args = append(args, "--pprof")
	}
	return append(args, extra...)
}
