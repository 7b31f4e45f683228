// Command asyncnode runs SQL tasks in the background for PostgreSQL users,
// on a cluster of nodes. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usageText = `asyncnode: a clustered scheduler that runs SQL tasks pushed into PostgreSQL.

Usage:
  asyncnode init   --dsn DSN                 install or upgrade the async schema
  asyncnode run    --dsn DSN --node-id ID --data-dir DIR [--http-addr H:P --raft-addr H:P --gossip-addr H:P] [--join ADDR,...]
  asyncnode status --http-addr H:P [--json]  show leader, members, pools, queue, failures
  asyncnode join   --http-addr H:P ADDR...   ask a running node to join the members at gossip ADDR
  asyncnode leave  --http-addr H:P           leave the cluster gracefully
  asyncnode dev    [--nodes N]               throwaway PostgreSQL + a local cluster, for trying it out
  asyncnode bench  [--nodes N] [--tasks K]   measure throughput and latency against the machine's own limit
  asyncnode version

Every flag can also be set with an ASYNCNODE_* environment variable
(--http-addr: ASYNCNODE_HTTP_ADDR); flags win. The server DSN also honours
libpq's PG* variables. Run 'asyncnode COMMAND --help' for a command's flags.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, osEnv)
	stop()
	os.Exit(code)
}

// run executes one command line and returns the process exit code:
// 0 success, 1 failure, 2 bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, env func(string) string) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return 2
	}
	cmds := map[string]func(context.Context, []string, io.Writer, io.Writer, func(string) string) error{
		"init":   cmdInit,
		"run":    cmdRun,
		"status": cmdStatus,
		"join":   cmdJoin,
		"leave":  cmdLeave,
		"dev":    cmdDev,
		"bench":  cmdBench,
	}
	name := args[0]
	switch name {
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usageText)
		return 0
	case "version", "--version":
		fmt.Fprintln(stdout, "asyncnode", version)
		return 0
	}
	fn, ok := cmds[name]
	if !ok {
		fmt.Fprintf(stderr, "asyncnode: unknown command %q (run 'asyncnode --help')\n", name)
		return 2
	}
	err := fn(ctx, args[1:], stdout, stderr, env)
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "asyncnode %s: %s\n", name, ue.msg)
		return 2
	default:
		fmt.Fprintf(stderr, "asyncnode %s: %v\n", name, err)
		return 1
	}
}
