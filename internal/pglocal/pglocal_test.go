package pglocal

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
)

func TestStartRestartStop(t *testing.T) {
	ctx := context.Background()
	s, err := Start(ctx, Options{Log: func(l string) { t.Log(l) }})
	require.NoError(t, err, "a throwaway PostgreSQL must start (install PostgreSQL server binaries)")
	defer s.Stop()

	require.NoError(t, s.CreateDatabase(ctx, "x", ""))
	c, err := pgx.Connect(ctx, s.DSN("x"))
	require.NoError(t, err)
	_, err = c.Exec(ctx, "create table t(i int); insert into t values (42)")
	require.NoError(t, err)
	c.Close(ctx)

	require.NoError(t, s.Halt(Immediate))
	_, err = pgx.Connect(ctx, s.DSN("x"))
	require.Error(t, err, "server must be down after Halt")
	require.NoError(t, s.Start(ctx))

	c, err = pgx.Connect(ctx, s.DSN("x"))
	require.NoError(t, err)
	defer c.Close(ctx)
	var v int
	require.NoError(t, c.QueryRow(ctx, "select i from t").Scan(&v))
	require.Equal(t, 42, v)
}

// TestListenAddresses starts a server on two loopback addresses: both
// accept connections, and DSN uses the first.
func TestListenAddresses(t *testing.T) {
	ctx := context.Background()
	s, err := Start(ctx, Options{ListenAddresses: []string{"127.0.0.2", "127.0.0.1"}})
	require.NoError(t, err)
	defer s.Stop()
	require.Contains(t, s.DSN("postgres"), "host=127.0.0.2 ")
	for _, host := range []string{"127.0.0.2", "127.0.0.1"} {
		c, err := pgx.Connect(ctx, strings.Replace(s.DSN("postgres"), "host=127.0.0.2", "host="+host, 1))
		require.NoError(t, err, host)
		var addr string
		require.NoError(t, c.QueryRow(ctx, "select host(inet_server_addr())").Scan(&addr))
		require.Equal(t, host, addr)
		c.Close(ctx)
	}
}

// TestSocketDSN: SocketDSN reaches the same server through its Unix-domain
// socket (inet_server_addr() is NULL there, 127.0.0.1 over DSN's TCP).
func TestSocketDSN(t *testing.T) {
	ctx := context.Background()
	s, err := Start(ctx, Options{})
	require.NoError(t, err, "a throwaway PostgreSQL must start (install PostgreSQL server binaries)")
	defer s.Stop()
	require.NoError(t, s.CreateDatabase(ctx, "x", ""))
	for dsn, want := range map[string]*string{s.SocketDSN("x"): nil, s.DSN("x"): new("127.0.0.1")} {
		c, err := pgx.Connect(ctx, dsn)
		require.NoError(t, err, dsn)
		var addr *string
		var db string
		require.NoError(t, c.QueryRow(ctx, "select host(inet_server_addr()), current_database()").Scan(&addr, &db))
		require.Equal(t, want, addr, dsn)
		require.Equal(t, "x", db)
		c.Close(ctx)
	}
}

// TestQuoteValue: a quoted value parses back to itself, whatever it holds.
func TestQuoteValue(t *testing.T) {
	for _, dir := range []string{"/tmp/sock", "/tmp/my dir", `/tmp/it's`, `/tmp/back\slash`} {
		cfg, err := pgx.ParseConfig("host=" + QuoteValue(dir) + " port=5 user=postgres dbname=x")
		require.NoError(t, err, dir)
		require.Equal(t, dir, cfg.Host)
		require.Equal(t, "x", cfg.Database)
	}
}

// TestFreePortsAreDistinct: ports picked together never repeat.
func TestFreePortsAreDistinct(t *testing.T) {
	for range 20 {
		ports, err := FreePorts(16)
		require.NoError(t, err)
		require.Len(t, ports, 16)
		seen := map[int]bool{}
		for _, p := range ports {
			require.False(t, seen[p], "port %d handed out twice in %v", p, ports)
			require.Positive(t, p)
			seen[p] = true
		}
	}
}
