package main

import (
	"flag"
	"io"
	"strings"
)

// benchSetsNodeFlag says whether bench gives its nodes the `run` flag name
// itself, and if so what to use instead (empty: nothing).
func benchSetsNodeFlag(name string) (sets bool, instead string) {
	switch name {
	case "dsn":
		return true, "--bench-dsn"
	case "log-level":
		return true, "bench's --log-level"
	case "node-id", "data-dir", "http-addr", "raft-addr", "gossip-addr", "join", "voters", "shutdown-timeout":
		return true, ""
	}
	return false, ""
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
	args := make([]string, 0, len(items))
	for _, it := range items {
		name, value, ok := strings.Cut(strings.TrimLeft(it, "-"), "=")
		if !ok || name == "" {
			return nil, usagef("--node-flag %q: give it as name=value, e.g. target-long-after=200ms", it)
		}
		f := fs.Lookup(name)
		if f == nil {
			return nil, usagef("--node-flag %q: asyncnode run has no flag --%s", it, name)
		}
		if sets, instead := benchSetsNodeFlag(name); sets {
			if instead != "" {
				return nil, usagef("--node-flag %q: bench sets --%s for its nodes itself; use %s", it, name, instead)
			}
			return nil, usagef("--node-flag %q: bench sets --%s for its nodes itself", it, name)
		}
		if err := f.Value.Set(value); err != nil {
			return nil, usagef("--node-flag %q: invalid value for --%s: %v", it, name, err)
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
