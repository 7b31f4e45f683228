package main

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestNodeRunArgs: bench's --node-flag values become `run` arguments, and
// every mistake is refused in one line before anything starts.
func TestNodeRunArgs(t *testing.T) {
	args, err := nodeRunArgs([]string{"target-long-after=200ms", "--target-short-conns=8", "pprof=true"})
	require.NoError(t, err)
	require.Equal(t, []string{"--target-long-after=200ms", "--target-short-conns=8", "--pprof=true"}, args)

	args, err = nodeRunArgs(nil)
	require.NoError(t, err)
	require.Empty(t, args)

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
		{[]string{"target-short-conns=many"}, `--node-flag "target-short-conns=many": invalid value for --target-short-conns`},
		// run's own checks, on the whole command line bench would give.
		{[]string{"target-short-conns=0"}, "--node-flag: --target-short-conns must be between 1 and 10000, got 0"},
		{[]string{"tls-cert=/c.pem"}, "--node-flag: --tls-cert, --tls-key and --tls-ca must be given together"},
		{[]string{"lost-after=2s", "lease=3s"}, "--node-flag: --lease (3s) must be shorter than --lost-after (2s)"},
	} {
		args, err := nodeRunArgs(c.items)
		require.ErrorContains(t, err, c.want, "%v", c.items)
		var ue usageError
		require.True(t, errors.As(err, &ue), "%v: %v is not a usage error (exit 2)", c.items, err)
		require.Nil(t, args)
	}
}
