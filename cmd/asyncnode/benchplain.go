package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/asyncnode/asyncnode/executor"
)

// plainBatch is how many tasks limit_bookkeeping and limit_plain_node
// claim, and at most finish, in one statement.
const plainBatch = 500

// plainClaim claims up to $1 READY tasks of bench (pool SELF, see push)
// in (priority, entered, task_id) order, skipping rows locked by others,
// and returns their ids: an ordered read of task_ready_idx, then one
// task_pkey lookup per id. (Until 2026-12-05 the
// limits joined the locked rows with the table instead, which the server
// ran as a sequential scan of the whole table, sorted, at every claim.)
const plainClaim = `with u as (
	  update async.task t set consumed = clock_timestamp(), attempt = t.attempt + 1
	   where t.task_id = any(array(
	     select task_id from async.task
	      where concurrency_pool = 'SELF' and consumed is null and processed is null and yielded is null
	      order by priority, entered, task_id limit $1 for update skip locked))
	  returning t.task_id)
	select coalesce(array_agg(task_id), '{}') from u`

// plainFinish marks the tasks $1 finished, as the plain limits do.
const plainFinish = `update async.task set processed = clock_timestamp(), finish_status = 'FINISHED', failed = false
	where task_id = any($1)`

// limitPlainNode runs one round of limit_plain_node: what a task's whole
// contract costs this server when the simplest program that keeps it does
// the work, with no node running. One session claims READY tasks in order
// plainBatch at a time (FOR UPDATE SKIP LOCKED, setting consumed and
// attempt) and marks them started; executor.DefaultShortConns sessions
// each run tasks' queries followed by the executor's session reset in the
// same write (executor.RunWithReset, as a node sends them); one session
// marks the finished ones processed, in batches. Three row updates and one
// round trip per task, as with a node, and nothing else: no Raft, no
// scheduler, no pool limits, no fencing, no time-outs. The node CPU figure
// of its line is bench's own process, which plays the node.
func (b *bench) limitPlainNode(ctx context.Context) (round, error) {
	if err := b.push(ctx, b.f.tasks, "select 0"); err != nil {
		return round{}, err
	}
	sessions := executor.DefaultShortConns
	conns := make([]*pgx.Conn, 0, sessions)
	defer func() {
		for _, c := range conns {
			c.Close(context.WithoutCancel(ctx))
		}
	}()
	for range sessions {
		c, err := pgx.Connect(ctx, b.dsn)
		if err != nil {
			return round{}, fmt.Errorf("limit_plain_node: open a task session: %w", err)
		}
		conns = append(conns, c)
	}

	type claimed struct {
		id    int64
		query string
	}
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	work := make(chan claimed, 2*plainBatch)
	done := make(chan int64, b.f.tasks) // never blocks a runner; closed when all ended
	meter := cpuMeter{nodes: func() []int { return []int{os.Getpid()} }, postmaster: b.cpu.postmaster}
	before := meter.sample()
	start := time.Now()

	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(work)
		for rctx.Err() == nil {
			var ids []int64
			if err := b.db.QueryRow(rctx, plainClaim, plainBatch).Scan(&ids); err != nil {
				cancel(fmt.Errorf("limit_plain_node: claim: %w", err))
				return
			}
			if len(ids) == 0 {
				return
			}
			rows, err := b.db.Query(rctx, `update async.task set started = clock_timestamp()
				where task_id = any($1) returning task_id, query`, ids)
			if err != nil {
				cancel(fmt.Errorf("limit_plain_node: start: %w", err))
				return
			}
			started, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (claimed, error) {
				var c claimed
				return c, r.Scan(&c.id, &c.query)
			})
			if err != nil {
				cancel(fmt.Errorf("limit_plain_node: start: %w", err))
				return
			}
			for _, c := range started {
				select {
				case work <- c:
				case <-rctx.Done():
					return
				}
			}
		}
	})
	for _, conn := range conns {
		wg.Go(func() {
			for c := range work {
				// As the executor sends a task: the text, then the session reset.
				execErr, resetErr := executor.RunWithReset(rctx, conn.PgConn(), c.query)
				if err := errors.Join(execErr, resetErr); err != nil {
					cancel(fmt.Errorf("limit_plain_node: task %d: %w", c.id, err))
					return
				}
				done <- c.id
			}
		})
	}

	go func() {
		wg.Wait()
		close(done)
	}()

	// Finish until the claimer and every runner have ended and done is empty.
	finished := 0
	err := func() error {
		for {
			var ids []int64
			select {
			case id, ok := <-done:
				if !ok {
					return nil
				}
				ids = append(ids, id)
			case <-rctx.Done():
				return context.Cause(rctx)
			}
		drain:
			for len(ids) < plainBatch {
				select {
				case id, ok := <-done:
					if !ok {
						break drain
					}
					ids = append(ids, id)
				default:
					break drain
				}
			}
			if _, err := b.db.Exec(rctx, plainFinish, ids); err != nil {
				return fmt.Errorf("limit_plain_node: finish: %w", err)
			}
			finished += len(ids)
		}
	}()
	elapsed := time.Since(start)
	after := meter.sample()
	cancel(err)
	for range done { // until every goroutine has ended
	}
	if err != nil {
		return round{}, err
	}
	// Every task went through all three updates, none twice.
	var ok int
	if err := b.db.QueryRow(ctx, `select count(*) from async.task
		where attempt = 1 and started is not null and processed is not null and finish_status = 'FINISHED'`).Scan(&ok); err != nil {
		return round{}, err
	}
	if ok != b.f.tasks {
		return round{}, fmt.Errorf("limit_plain_node: %d of %d tasks were claimed, started and finished once", ok, b.f.tasks)
	}
	r := round{tasks: finished, secs: elapsed.Seconds(), cpu: meter.perTask(before, after, finished)}
	return r, b.reset(ctx, false)
}
