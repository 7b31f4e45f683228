package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/asyncnode/asyncnode/internal/pglocal"
	"github.com/asyncnode/asyncnode/pgstore"
)

// cmdDev starts a throwaway PostgreSQL and a local cluster of child node
// processes, prints how to use them, and cleans everything up on Ctrl-C.
func cmdDev(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) error {
	fs := newFlagSet("dev", stdout, "asyncnode dev: a throwaway PostgreSQL and a local cluster, for trying asyncnode out")
	nodes := fs.Int("nodes", 1, "number of nodes")
	var lf logFlags
	lf.register(fs)
	if err := parse(fs, args, env); err != nil {
		return err
	}
	if *nodes < 1 || *nodes > 9 {
		return usagef("--nodes must be between 1 and 9, got %d", *nodes)
	}
	log, err := lf.logger(stderr)
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, "starting a throwaway PostgreSQL ...")
	pg, err := pglocal.Start(ctx, pglocal.Options{})
	if err != nil {
		return err
	}
	defer pg.Stop()
	if err := pg.CreateDatabase(ctx, "asyncnode", ""); err != nil {
		return err
	}
	dsn := pg.DSN("asyncnode")
	if _, err := pgstore.Migrate(ctx, dsn, log); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "asyncnode-dev-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	lc, err := startLocalCluster(dsn, dir, *nodes, lf.level)
	if err != nil {
		return err
	}
	defer lc.stop()
	if err := lc.waitReady(ctx, 60*time.Second); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	fmt.Fprintf(stdout, "\nasyncnode is running: PostgreSQL on 127.0.0.1:%d, %d node(s).\n\n", pg.Port(), *nodes)
	fmt.Fprintf(stdout, "Connect with:\n  psql \"%s\"\n\nThen try:\n", dsn)
	fmt.Fprintln(stdout, "  SELECT async.push_tasks(array[async.task('select 0', 'SELF')]);")
	fmt.Fprintln(stdout, "  SELECT task_id, consumed, processed, finish_status FROM async.task ORDER BY task_id DESC LIMIT 5;")
	fmt.Fprintln(stdout, "\nNodes:")
	for _, c := range lc.children {
		fmt.Fprintf(stdout, "  %s  pid %d  api %s  log %s\n", c.id, c.cmd.Process.Pid, c.api, c.logPath)
	}
	self, _ := os.Executable()
	fmt.Fprintf(stdout, "\nStatus:  %s status --http-addr %s\n", self, lc.children[0].api)
	if *nodes > 1 {
		fmt.Fprintf(stdout, "Failover: kill -9 <pid of the leader>, then run status against another node.\n")
	}
	fmt.Fprintln(stdout, "\nPress Ctrl-C to stop everything and remove all files.")
	<-ctx.Done()
	fmt.Fprintln(stdout, "\nstopping ...")
	return nil
}
