package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestNodeRunArgs: bench's --node-flag values become `run` arguments, and
// every mistake is refused in one line before anything starts.
func TestNodeRunArgs(t *testing.T) {
	key := "c2l4dGVlbi1ieXRlLWtleQ==" // 16 bytes
	args, err := nodeRunArgs([]string{"target-long-after=200ms", "--target-short-conns=8", "pprof=true", "gossip-key=" + key})
	require.NoError(t, err)
	require.Equal(t, []string{"--target-long-after=200ms", "--target-short-conns=8", "--pprof=true", "--gossip-key=" + key}, args)
	require.Equal(t, []string{"--target-long-after=200ms", "--target-short-conns=8", "--pprof=true", "--gossip-key=xxxxx"}, shownNodeArgs(args),
		"what bench prints must not show the gossip key")
	require.Equal(t, "--gossip-key="+key, args[3], "shownNodeArgs changed the arguments")

	args, err = nodeRunArgs(nil)
	require.NoError(t, err)
	require.Empty(t, args)
	require.Empty(t, shownNodeArgs(args))

	for _, c := range []struct {
		items []string
		want  string
	}{
		{[]string{"target-long-after"}, `--node-flag "target-long-after": give it as name=value`},
		{[]string{"=5"}, "give it as name=value"},
		{[]string{"no-such-flag=1"}, "asyncnode run has no flag --no-such-flag"},
		{[]string{"dsn=host=x"}, "bench sets --dsn for its nodes itself; use --bench-dsn"},
		{[]string{"log-level=debug"}, "use bench's --log-level"},
		{[]string{"--node-id=x"}, "bench sets --node-id for its nodes itself"},
		{[]string{"join=127.0.0.1:1"}, "bench sets --join"},
		{[]string{"tls-cert=/c.pem"}, "over plain HTTP without a token, so it cannot run them with --tls-cert"},
		{[]string{"token=s3cret"}, "cannot run them with --token"},
		{[]string{"target-short-conns=many"}, `--node-flag "target-short-conns=many": invalid value for --target-short-conns`},
		// run's own checks, on the whole command line bench would give.
		{[]string{"target-short-conns=0"}, "--node-flag: --target-short-conns must be between 1 and 10000, got 0"},
		{[]string{"gossip-key=s3cret"}, "--node-flag: --gossip-key must be base64"},
		{[]string{"lost-after=2s", "lease=3s"}, "--node-flag: --lease (3s) must be shorter than --lost-after (2s)"},
	} {
		args, err := nodeRunArgs(c.items)
		require.ErrorContains(t, err, c.want, "%v", c.items)
		require.NotContains(t, err.Error(), "s3cret", "a secret in the message")
		var ue usageError
		require.True(t, errors.As(err, &ue), "%v: %v is not a usage error (exit 2)", c.items, err)
		require.Nil(t, args)
	}
}

// TestNodeRunArgsRefusesWhatBenchSets: every `run` flag on the command
// line bench gives its nodes (localNodeArgs) is refused in --node-flag.
func TestNodeRunArgsRefusesWhatBenchSets(t *testing.T) {
	n := 0
	for _, a := range localNodeArgs("d", "dir", "node2", [3]string{"a", "b", "c"}, 3, "warn", "j") {
		name, ok := strings.CutPrefix(a, "--")
		if !ok {
			continue
		}
		n++
		_, err := nodeRunArgs([]string{name + "=x"})
		require.ErrorContains(t, err, "bench sets --"+name+" for its nodes itself", "--%s", name)
	}
	require.Equal(t, 10, n, "flags on a joining node's command line")
}

// TestBenchNodeArgs: every node bench starts gets the --node-flag
// arguments, and bench's own for that cluster after them, so that they
// win (the scale-out figure's --max-tasks); --pprof when profiling.
func TestBenchNodeArgs(t *testing.T) {
	b := &bench{nodeFlagArgs: []string{"--max-tasks=64", "--target-long-after=200ms"}}
	require.Equal(t, []string{"--max-tasks=64", "--target-long-after=200ms"}, b.nodeArgs())
	require.Equal(t, []string{"--max-tasks=64", "--target-long-after=200ms", "--max-tasks", "8"}, b.nodeArgs("--max-tasks", "8"))
	b.f.profileSeconds = 5
	require.Equal(t, []string{"--max-tasks=64", "--target-long-after=200ms", "--pprof", "--max-tasks", "8"}, b.nodeArgs("--max-tasks", "8"))
	require.Equal(t, []string{"--max-tasks=64", "--target-long-after=200ms"}, b.nodeFlagArgs, "nodeArgs changed bench's own list")
	require.Empty(t, (&bench{}).nodeArgs())
}
