package main

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
)

// TestDevRunsTasksAndCleansUp runs `asyncnode dev` (what `make demo` runs)
// like a user: read the psql connection string it prints, push the README
// example there, see it finish, press Ctrl-C, and check that the nodes, the
// PostgreSQL server and every file are gone.
func TestDevRunsTasksAndCleansUp(t *testing.T) {
	cmd := exec.Command(testBin, "dev", "--nodes", "2")
	cmd.Env = filteredEnv()
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	errFile, err := os.Create(t.TempDir() + "/stderr")
	require.NoError(t, err)
	defer errFile.Close()
	cmd.Stderr = errFile
	stderr := func() string { b, _ := os.ReadFile(errFile.Name()); return string(b) }
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-done
		}
	})

	var printed strings.Builder
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(120 * time.Second)
	var dsn string
	var logs []string
wait:
	for {
		select {
		case l, ok := <-lines:
			require.True(t, ok, "dev exited early:\n%s\n%s", printed.String(), stderr())
			printed.WriteString(l + "\n")
			if m := regexp.MustCompile(`psql "([^"]+)"`).FindStringSubmatch(l); m != nil {
				dsn = m[1]
			}
			if m := regexp.MustCompile(`log (\S+)$`).FindStringSubmatch(l); m != nil {
				logs = append(logs, m[1])
			}
			if strings.Contains(l, "Press Ctrl-C") {
				break wait
			}
		case <-timeout:
			t.Fatalf("dev never became ready:\n%s\n%s", printed.String(), stderr())
		}
	}
	go func() {
		for range lines {
		}
	}()
	require.NotEmpty(t, dsn, "no psql command printed:\n%s", printed.String())
	require.Len(t, logs, 2)

	ctx := context.Background()
	db, err := pgxpool.New(ctx, dsn)
	require.NoError(t, err)
	_, err = db.Exec(ctx, "SELECT async.push_tasks(array[async.task('select 0', 'SELF')]);")
	require.NoError(t, err)
	waitAllDone(t, db, 60*time.Second)
	var status string
	require.NoError(t, db.QueryRow(ctx, "select finish_status::text from async.task").Scan(&status))
	require.Equal(t, "FINISHED", status)
	db.Close()

	require.NoError(t, cmd.Process.Signal(syscall.SIGINT))
	select {
	case err := <-done:
		require.NoError(t, err, "dev did not exit cleanly: %s", stderr())
	case <-time.After(60 * time.Second):
		t.Fatal("dev did not stop on Ctrl-C")
	}
	for _, l := range logs {
		_, err := os.Stat(l)
		require.True(t, os.IsNotExist(err), "%s was left behind", l)
	}
	p, err := pgxpool.New(ctx, dsn)
	require.NoError(t, err)
	defer p.Close()
	require.Error(t, p.Ping(ctx), "PostgreSQL still runs after Ctrl-C")
}
