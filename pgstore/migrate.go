package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
)

//go:embed migrations/*.sql
var migrationFS embed.FS

// migrateLockKey is the transaction advisory lock that serialises
// concurrent Migrate calls ("asyncmig" in ASCII). It is distinct from
// control.advisory_mutex_id, so a running leader never blocks a migration.
const migrateLockKey int64 = 0x6173796e636d6967

type migration struct {
	version int
	name    string
	sql     string
}

var migrations = mustLoadMigrations()

// loadMigrations reads migrations/NNNN_name.sql, ordered by version; versions
// must be 1, 2, 3, ... without gaps or duplicates.
func loadMigrations(fsys fs.FS) ([]migration, error) {
	entries, err := fs.ReadDir(fsys, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".sql") {
			continue
		}
		num, rest, ok := strings.Cut(strings.TrimSuffix(name, ".sql"), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 || rest == "" {
			return nil, fmt.Errorf("migration file %s: want NNNN_name.sql", name)
		}
		b, err := fs.ReadFile(fsys, path.Join("migrations", name))
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: rest, sql: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	for i, m := range ms {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration versions must be 1..n without gaps: found %d at position %d", m.version, i+1)
		}
	}
	if len(ms) == 0 {
		return nil, errors.New("no migrations embedded")
	}
	return ms, nil
}

func mustLoadMigrations() []migration {
	ms, err := loadMigrations(migrationFS)
	if err != nil {
		panic("pgstore: " + err.Error())
	}
	return ms
}

// CurrentVersion is the newest schema version embedded in this binary.
func CurrentVersion() int { return migrations[len(migrations)-1].version }

// Migrate installs or upgrades the async schema in the database dsn points
// at. Each missing migration is applied in its own transaction, in order,
// under a transaction advisory lock (concurrent callers wait, then find
// nothing to do), and recorded in async.schema_migrations. Running it again
// changes nothing. It returns the versions it applied, and ErrSchemaTooNew
// if the database was migrated by a newer binary.
func Migrate(ctx context.Context, dsn string, log hclog.Logger) (applied []int, err error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("pgstore: migrate: connect to %s: %w", MaskDSN(dsn), redact(err, dsn))
	}
	defer conn.Close(context.WithoutCancel(ctx))

	for _, m := range migrations {
		did, err := applyMigration(ctx, conn, m)
		if err != nil {
			return applied, translate(fmt.Sprintf("migrate %04d_%s", m.version, m.name), dsn, err)
		}
		if did {
			applied = append(applied, m.version)
			log.Info("applied migration", "version", m.version, "name", m.name)
		}
	}
	if len(applied) == 0 {
		log.Debug("schema up to date", "version", CurrentVersion())
	}
	return applied, nil
}

func applyMigration(ctx context.Context, conn *pgx.Conn, m migration) (bool, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()

	if _, err := tx.Exec(ctx, qMigrateLock, migrateLockKey); err != nil {
		return false, err
	}
	if m.version == 1 {
		var foreign bool
		// Before creating async.schema_migrations: is the schema someone else's?
		var exists bool
		if err := tx.QueryRow(ctx, qSchemaExists).Scan(&exists); err != nil {
			return false, err
		}
		if !exists {
			if err := tx.QueryRow(ctx, qMigrateForeign).Scan(&foreign); err != nil {
				return false, err
			}
			if foreign {
				return false, errors.New("the database already has an async schema that asyncnode did not install " +
					"(a pgasync install?); use another database or move that schema away")
			}
		}
	}
	if _, err := tx.Exec(ctx, qMigrateBootstrap); err != nil {
		return false, err
	}
	rows, err := tx.Query(ctx, qMigrateApplied)
	if err != nil {
		return false, err
	}
	done, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return false, err
	}
	if n := len(done); n > 0 && int(done[n-1]) > CurrentVersion() {
		return false, fmt.Errorf("%w: the database has schema version %d, this binary knows up to %d",
			ErrSchemaTooNew, done[n-1], CurrentVersion())
	}
	for _, v := range done {
		if int(v) == m.version {
			return false, nil
		}
	}
	if _, err := tx.Exec(ctx, m.sql); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, qMigrateRecord, m.version, m.name); err != nil {
		return false, err
	}
	return true, tx.Commit(ctx)
}

// CheckSchema reports whether the server database holds exactly the schema
// this binary needs: ErrSchemaMissing, ErrSchemaTooNew or ErrSchemaOutdated
// (all wrapped with the versions) otherwise.
func (s *Store) CheckSchema(ctx context.Context) error {
	var exists bool
	if err := s.pool.QueryRow(ctx, qSchemaExists).Scan(&exists); err != nil {
		return s.wrap("check schema", err)
	}
	var ver int32
	if exists {
		if err := s.pool.QueryRow(ctx, qSchemaVersion).Scan(&ver); err != nil {
			return s.wrap("check schema", err)
		}
	}
	switch {
	case ver == 0:
		return ErrSchemaMissing
	case int(ver) > CurrentVersion():
		return fmt.Errorf("%w: the database has schema version %d, this binary knows up to %d",
			ErrSchemaTooNew, ver, CurrentVersion())
	case int(ver) < CurrentVersion():
		return fmt.Errorf("%w: the database has schema version %d, this binary needs %d",
			ErrSchemaOutdated, ver, CurrentVersion())
	}
	return nil
}
