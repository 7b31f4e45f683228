package pglocal

import (
	"context"
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
