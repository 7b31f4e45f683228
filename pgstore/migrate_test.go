package pgstore_test

import (
	"context"
	"strconv"
	"testing"

	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"
)

func TestMigrateTwiceIsNoop(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := h.EmptyDB(t)

	applied, err := pgstore.Migrate(ctx, dsn, hclog.NewNullLogger())
	require.NoError(t, err)
	want := make([]int, pgstore.CurrentVersion())
	for i := range want {
		want[i] = i + 1
	}
	require.Equal(t, want, applied)

	db := connect(t, dsn)
	before := queryStrings(t, db, `SELECT version || ':' || name || ':' || applied_at FROM async.schema_migrations ORDER BY version`)
	require.Len(t, before, pgstore.CurrentVersion())

	applied, err = pgstore.Migrate(ctx, dsn, nil)
	require.NoError(t, err)
	require.Empty(t, applied)
	after := queryStrings(t, db, `SELECT version || ':' || name || ':' || applied_at FROM async.schema_migrations ORDER BY version`)
	require.Equal(t, before, after)
}

func TestMigrateConcurrent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := h.EmptyDB(t)
	const n = 4
	results := make(chan []int, n)
	errs := make(chan error, n)
	for range n {
		go func() {
			applied, err := pgstore.Migrate(ctx, dsn, nil)
			results <- applied
			errs <- err
		}()
	}
	total := 0
	for range n {
		require.NoError(t, <-errs)
		total += len(<-results)
	}
	require.Equal(t, pgstore.CurrentVersion(), total, "each migration applied exactly once")
}

func TestMigrateRefusesNewerSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := h.DB(t)
	c := connect(t, dsn)
	exec(t, c, `INSERT INTO async.schema_migrations (version, name) VALUES ($1, 'future')`, pgstore.CurrentVersion()+1)
	_, err := pgstore.Migrate(ctx, dsn, nil)
	require.ErrorIs(t, err, pgstore.ErrSchemaTooNew)
}

func TestMigrateUpgradesOlderSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := h.DB(t)
	c := connect(t, dsn)
	fillfactor := `SELECT coalesce(reloptions::text, '') FROM pg_class WHERE oid = 'async.task'::regclass`
	require.Equal(t, []string{"{fillfactor=70}"}, queryStrings(t, c, fillfactor))
	// Pretend the migrations from 5 on were never applied: undo what 5 and 6
	// did (7 only replaces a function).
	exec(t, c, `ALTER TABLE async.leader DROP COLUMN raft_term, DROP COLUMN term_offset`)
	exec(t, c, `UPDATE async.leader SET term = 7`)
	exec(t, c, `ALTER TABLE async.task RESET (fillfactor)`)
	exec(t, c, `DELETE FROM async.schema_migrations WHERE version >= 5`)
	applied, err := pgstore.Migrate(ctx, dsn, nil)
	require.NoError(t, err)
	require.Equal(t, []int{5, 6, 7}, applied)
	require.Equal(t, []string{strconv.Itoa(pgstore.CurrentVersion())}, queryStrings(t, c, `SELECT max(version)::text FROM async.schema_migrations`))
	require.Equal(t, []string{"7:7:0"}, queryStrings(t, c, `SELECT term || ':' || raft_term || ':' || term_offset FROM async.leader`))
	require.Equal(t, []string{"{fillfactor=70}"}, queryStrings(t, c, fillfactor))
}

func TestMigrateRefusesForeignSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := h.EmptyDB(t)
	c := connect(t, dsn)
	exec(t, c, `CREATE SCHEMA async; CREATE TABLE async.control (enabled bool)`)
	_, err := pgstore.Migrate(ctx, dsn, nil)
	require.ErrorContains(t, err, "did not install")
	require.Equal(t, []string{"control"}, queryStrings(t, c,
		`SELECT relname::text FROM pg_class WHERE relnamespace = 'async'::regnamespace`), "nothing created")
}
