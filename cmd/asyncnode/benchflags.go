package main

import (
	"flag"
	"io"
	"slices"
	"strings"
)

// refusedNodeFlag says why bench does not take the `run` flag name in
// --node-flag, or "" if it does: bench sets some itself, and it reaches
// its nodes' API over plain HTTP without a token.
func refusedNodeFlag(name string) string {
	switch name {
	case "dsn":
		return "bench sets --dsn for its nodes itself; use --bench-dsn"
	case "log-level":
		return "bench sets --log-level for its nodes itself; use bench's --log-level"
	case "node-id", "data-dir", "http-addr", "raft-addr", "gossip-addr", "join", "voters", "shutdown-timeout":
		return "bench sets --" + name + " for its nodes itself"
	case "tls-cert", "tls-key", "tls-ca", "token":
		return "bench reaches its nodes' API over plain HTTP without a token, so it cannot run them with --" + name
	}
	return ""
}

// shownNodeFlag is name=value as bench prints it: the value of a secret
// masked as connection strings' passwords are.
func shownNodeFlag(name, value string) string {
	if name == "gossip-key" {
		value = "xxxxx"
	}
	return name + "=" + value
}

// nodeRunArgs turns bench's --node-flag values (name=value, the name with
// or without leading dashes) into `asyncnode run` arguments for every node
// bench starts. Each name must be a flag of `run` that bench does not set
// itself, each value must parse, and together they must pass run's own
// checks (ranges, flags that go together), so that a mistake is reported
// in one line before bench starts anything rather than as a node that
// exits during the run.
func nodeRunArgs(items []string) (args, shown []string, err error) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var rf runFlags
	rf.register(fs)
	for _, it := range items {
		name, value, ok := strings.Cut(strings.TrimLeft(it, "-"), "=")
		if !ok || name == "" {
			return nil, nil, usagef("--node-flag %q: give it as name=value, e.g. target-long-after=200ms", it)
		}
		f := fs.Lookup(name)
		if f == nil {
			return nil, nil, usagef("--node-flag %q: asyncnode run has no flag --%s", name, name)
		}
		if why := refusedNodeFlag(name); why != "" {
			return nil, nil, usagef("--node-flag %q: %s", name, why)
		}
		if err := f.Value.Set(value); err != nil {
			return nil, nil, usagef("--node-flag %q: invalid value for --%s: %v", shownNodeFlag(name, value), name, err)
		}
		args = append(args, "--"+name+"="+value)
		shown = append(shown, "--"+shownNodeFlag(name, value))
	}
	// What bench sets itself, so that run's checks see a whole command line.
	rf.nodeID, rf.dataDir, rf.dsn = "node1", "node1", "host=127.0.0.1"
	if _, err := rf.validate(); err != nil {
		return nil, nil, usagef("--node-flag: %v", err)
	}
	return args, shown, nil
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
