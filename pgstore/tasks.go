package pgstore

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// rollbackTimeout bounds the ROLLBACK of a claim that failed inside its
// transaction; past it the session is closed instead.
const rollbackTimeout = time.Second

// purgeBatch is how many finished tasks PurgeHistory deletes per transaction.
const purgeBatch = 10000

func refArrays(refs []Ref) (ids []int64, attempts []int32) {
	ids = make([]int64, len(refs))
	attempts = make([]int32, len(refs))
	for i, r := range refs {
		ids[i], attempts[i] = r.TaskID, r.Attempt
	}
	return ids, attempts
}

// ClaimTasks claims READY, eligible (eligible_when NULL or <= Now) tasks in
// (priority, entered, task_id) order, in one fenced transaction: each pool
// gives at most its limit (async.concurrency_pool, else
// control.default_concurrency_pool_workers, read now: D6) minus
// PoolRunning[pool]; all pools together give at most len(Slots). Claimed rows
// get attempt+1, consumed = Now, started NULL, times_up = Now + (manual_timeout,
// else target default_timeout, else control default_timeout), tracked, and
// node = Slots[i] for the i-th claimed query task (non-query tasks take a
// place of the global limit but no node: External). Rows come back in
// (priority, entered, task_id) order. ErrStaleTerm if req.Term is not the
// newest term recorded.
//
// Two round trips on the claim pool: BEGIN and claim_select.sql (which
// locks the tasks), then the fence, claim_update.sql once per node and
// time-out, and COMMIT. Both statements run on cached generic plans (see
// claimSettings). The fence's lock on async.leader is taken in the second
// round trip, which the server runs without waiting for the leader, so a
// takeover never waits for a leader that stopped between the two; the
// task rows the first locked stay locked until the server ends that
// session (claimIdleTimeout), and other claims skip them meanwhile.
func (s *Store) ClaimTasks(ctx context.Context, req ClaimRequest) ([]Claimed, error) {
	if len(req.Slots) == 0 {
		return nil, nil
	}
	term, err := termArg(req.Term)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(req.PoolRunning))
	for n := range req.PoolRunning {
		names = append(names, n)
	}
	sort.Strings(names)
	running := make([]int32, len(names))
	for i, n := range names {
		running[i] = int32(req.PoolRunning[n])
	}
	exclude := req.Exclude
	if exclude == nil {
		exclude = []int64{}
	}
	pc, err := s.claims.Acquire(ctx)
	if err != nil {
		return nil, s.wrap("claim tasks", err)
	}
	defer pc.Release()
	c := pc.Conn()
	out, err := s.claimOn(ctx, c, term, req, names, running, exclude)
	if err != nil && c.PgConn().TxStatus() != 'I' && ctx.Err() == nil {
		// Released inside a transaction, the session is closed (which ends
		// the transaction) and its cached plans are lost: end the
		// transaction instead if the server answers at once.
		rctx, cancel := context.WithTimeout(ctx, rollbackTimeout)
		_, _ = c.Exec(rctx, "ROLLBACK")
		cancel()
	}
	return out, err
}

// claimGroup is the claimed tasks that share a node and a time-out: one
// claim_update.sql call.
type claimGroup struct {
	node    pgtype.Text // NULL for external tasks
	timeout pgtype.Interval
}

// claimOn runs the claim's transaction on c (see ClaimTasks).
func (s *Store) claimOn(ctx context.Context, c *pgx.Conn, term int64, req ClaimRequest,
	names []string, running []int32, exclude []int64) ([]Claimed, error) {
	ids, groups, err := claimLock(ctx, c, req, names, running, exclude)
	if err != nil {
		return nil, s.wrap("claim tasks", err)
	}
	updated, err := claimCommit(ctx, c, term, req.Now, groups)
	if err != nil {
		return nil, s.wrap("claim tasks", err)
	}
	if len(ids) == 0 {
		return nil, nil
	}
	// In claim_select's order. Every locked row is updated; were one not,
	// it would simply stay READY.
	out := make([]Claimed, 0, len(updated))
	for _, id := range ids {
		if cl, ok := updated[id]; ok {
			out = append(out, cl)
		}
	}
	return out, nil
}

// claimLock is the claim's first round trip: BEGIN, and claim_select.sql,
// which locks the tasks to claim. It returns their ids in claim_select's
// order, grouped for claim_update.sql. The transaction stays open.
func claimLock(ctx context.Context, c *pgx.Conn, req ClaimRequest,
	names []string, running []int32, exclude []int64) ([]int64, map[claimGroup][]int64, error) {
	var ids []int64
	groups := map[claimGroup][]int64{}
	slot := 0
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue(qClaimSelect, req.Now, int32(len(req.Slots)), names, running, exclude).Query(func(rows pgx.Rows) error {
		// Scan's destinations are declared once per batch, not per row:
		// Scan takes their addresses, so each would be a heap allocation.
		var id int64
		var external bool
		var g claimGroup
		for rows.Next() {
			g.node = pgtype.Text{}
			if err := rows.Scan(&id, &external, &g.timeout); err != nil {
				return err
			}
			if !external {
				if slot >= len(req.Slots) {
					return fmt.Errorf("the claim returned more query tasks than the %d slots offered", len(req.Slots))
				}
				g.node = pgtype.Text{String: req.Slots[slot], Valid: true}
				slot++
			}
			ids = append(ids, id)
			groups[g] = append(groups[g], id)
		}
		return rows.Err()
	})
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		return nil, nil, err
	}
	return ids, groups, nil
}

// claimCommit is the claim's second round trip, in claimLock's
// transaction: the fence (which fails with AS001 unless term is still the
// newest, and then nothing after it runs: the transaction is aborted, and
// ClaimTasks rolls it back), claim_update.sql for each group and COMMIT,
// sent at once. It returns the updated rows by task id. With nothing to
// update it still checks the fence, so a superseded leader learns it at its
// next claim.
func claimCommit(ctx context.Context, c *pgx.Conn, term int64, now time.Time,
	groups map[claimGroup][]int64) (map[int64]Claimed, error) {
	n := 0
	for _, gids := range groups {
		n += len(gids)
	}
	updated := make(map[int64]Claimed, n) // sized once: a claim takes up to hundreds
	b := &pgx.Batch{}
	b.Queue(qAssertLeaderTerm, term)
	for g, gids := range groups {
		b.Queue(qClaimUpdate, now, gids, g.node, g.timeout).Query(func(rows pgx.Rows) error {
			var cl Claimed // declared once: see claimLock
			for rows.Next() {
				if err := rows.Scan(&cl.TaskID, &cl.Attempt, &cl.Node, &cl.Pool, &cl.Target, &cl.Deadline, &cl.External); err != nil {
					return err
				}
				updated[cl.TaskID] = cl
			}
			return rows.Err()
		})
	}
	b.Queue("COMMIT")
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		return nil, err
	}
	return updated, nil
}

// Unclaim puts claimed attempts that were never started back to READY
// (consumed, times_up and node cleared; attempt kept, the next claim
// increments it). Attempts already started, finished or re-claimed are left
// alone. Fenced by term.
func (s *Store) Unclaim(ctx context.Context, term uint64, refs []Ref) error {
	if len(refs) == 0 {
		return nil
	}
	ids, attempts := refArrays(refs)
	return s.fencedOn(ctx, s.lookups, "unclaim tasks", term, func(b *pgx.Batch) {
		b.Queue(qUnclaimTasks, ids, attempts)
	})
}

// StartTasks marks node's claimed attempts started (started = now) and
// returns what the node needs to run them, in the order of refs. Refs that
// are fenced out (another attempt or node, finished, reset, or already
// started) are simply absent.
func (s *Store) StartTasks(ctx context.Context, node string, refs []Ref) ([]StartedTask, error) {
	if len(refs) == 0 {
		return nil, nil
	}
	got := make([]StartedTask, 0, len(refs))
	// The connection strings of the targets the started tasks name, from
	// the rows after the tasks' (start_tasks.sql).
	conns := make(map[string]*string, 1)
	b := &pgx.Batch{}
	for _, run := range idRuns(refs) {
		ids, attempts := refArrays(run)
		b.Queue(qStartTasks, node, ids, attempts).Query(func(rows pgx.Rows) error {
			// Declared once: see claimLock. A target row has no task id,
			// attempt, text, flag or time-out. Scan sets conn to nil for
			// NULL and to a new string otherwise, so the strings kept in
			// conns are never overwritten.
			var (
				id       pgtype.Int8
				attempt  pgtype.Int4
				query    pgtype.Text
				target   string
				conn     *string
				async    pgtype.Bool
				deadline pgtype.Timestamptz
			)
			for rows.Next() {
				if err := rows.Scan(&id, &attempt, &query, &target, &conn, &async, &deadline); err != nil {
					return err
				}
				if !id.Valid {
					conns[target] = conn
					continue
				}
				got = append(got, StartedTask{TaskID: id.Int64, Attempt: attempt.Int32, Query: query.String,
					Target: target, Async: async.Bool, Deadline: deadline.Time})
			}
			return rows.Err()
		})
	}
	if err := s.lookups.SendBatch(ctx, b).Close(); err != nil {
		return nil, s.wrap("start tasks", err)
	}
	for i := range got {
		conn, ok := conns[got[i].Target]
		got[i].ConnStr, got[i].TargetGone = conn, !ok
	}
	return inRefOrder(refs, got), nil
}

// idRuns returns refs in ascending task id order, in runs that hold each
// id once: the form of start_tasks.sql's ids, which finds each row's
// attempt by the position of its id (width_bucket). The k-th ref of an id
// goes to run k, so there is one run unless an id is given twice.
func idRuns(refs []Ref) [][]Ref {
	if len(refs) == 0 {
		return nil
	}
	sorted := slices.SortedStableFunc(slices.Values(refs), func(a, b Ref) int { return cmp.Compare(a.TaskID, b.TaskID) })
	// Run 0 is compacted into sorted itself (it never gets ahead of the
	// loop), so the usual single run costs no copy beyond the sort's.
	runs := [][]Ref{sorted[:0]}
	var prev int64
	k := 0 // how many refs of this id came before
	for i, r := range sorted {
		if i > 0 && r.TaskID == prev {
			k++
		} else {
			k = 0
		}
		prev = r.TaskID
		if k == len(runs) {
			runs = append(runs, nil)
		}
		runs[k] = append(runs[k], r)
	}
	return runs
}

// inRefOrder returns the tasks of got in the order of refs; refs without
// a task (fenced out) are left out, and so are tasks no ref asked for.
// The server returns an UPDATE's rows in whatever order its plan makes.
func inRefOrder(refs []Ref, got []StartedTask) []StartedTask {
	pos := make(map[Ref]int, len(refs))
	for i, r := range refs {
		pos[r] = i
	}
	placed := make([]StartedTask, len(refs))
	for _, t := range got {
		if i, ok := pos[Ref{t.TaskID, t.Attempt}]; ok {
			placed[i] = t
		}
	}
	out := placed[:0]
	for _, t := range placed {
		if t.TaskID != 0 { // task ids start at 1
			out = append(out, t)
		}
	}
	return out
}

// FinishTasks records the outcomes of node's attempts in one statement,
// fenced on (task_id, attempt, node) and the attempt still RUNNING.
// FINISHED, FAILED, TIMED_OUT and CANCELED end the task (processed = At;
// failed for all but FINISHED; processing_error = Error); FINISHED on a task
// flagged yield_upon_finish, and YIELDED (asynchronous target), leave it
// YIELDED (yielded = At). It returns one Finished per outcome, in order;
// Applied is false for fenced-out or repeated refs.
func (s *Store) FinishTasks(ctx context.Context, node string, outs []Outcome) ([]Finished, error) {
	if len(outs) == 0 {
		return nil, nil
	}
	seen := make(map[Ref]bool, len(outs))
	idx := make([]int, 0, len(outs))
	for i, o := range outs {
		switch o.Status {
		case StatusFinished, StatusFailed, StatusTimedOut, StatusCanceled, StatusYielded, StatusLost:
		default:
			return nil, fmt.Errorf("pgstore: finish tasks: task %d attempt %d: invalid status %q", o.TaskID, o.Attempt, o.Status)
		}
		if !seen[o.Ref] {
			seen[o.Ref] = true
			idx = append(idx, i)
		}
	}
	// Lock rows in id order, like async.finish: no deadlocks between them.
	sort.Slice(idx, func(a, b int) bool { return outs[idx[a]].TaskID < outs[idx[b]].TaskID })
	ids := make([]int64, len(idx))
	attempts := make([]int32, len(idx))
	statuses := make([]string, len(idx))
	errs := make([]*string, len(idx))
	ats := make([]time.Time, len(idx))
	for k, i := range idx {
		o := outs[i]
		ids[k], attempts[k], statuses[k], errs[k], ats[k] = o.TaskID, o.Attempt, string(o.Status), o.Error, o.At
	}
	rows, err := s.lookups.Query(ctx, qFinishTasks, node, ids, attempts, statuses, errs, ats)
	if err != nil {
		return nil, s.wrap("finish tasks", err)
	}
	type res struct{ yielded, hold bool }
	got := make(map[Ref]res, len(idx))
	var r Ref // declared once: see claimLock
	var v res
	for rows.Next() {
		if err := rows.Scan(&r.TaskID, &r.Attempt, &v.yielded, &v.hold); err != nil {
			rows.Close()
			return nil, s.wrap("finish tasks", err)
		}
		got[r] = v
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("finish tasks", err)
	}
	out := make([]Finished, len(outs))
	for i, o := range outs {
		out[i] = Finished{Ref: o.Ref}
		if v, ok := got[o.Ref]; ok {
			out[i] = Finished{Ref: o.Ref, Applied: true, Yielded: v.yielded, HoldPool: v.yielded && v.hold}
			delete(got, o.Ref) // a repeated ref is reported once
		}
	}
	return out, nil
}

func scanTaskStates(rows pgx.Rows) ([]TaskState, error) {
	var out []TaskState
	for rows.Next() {
		var t TaskState
		var state string
		if err := rows.Scan(&t.TaskID, &t.Attempt, &t.Node, &state, &t.Started, &t.External, &t.TrackYielded,
			&t.Pool, &t.TimesUp); err != nil {
			rows.Close()
			return nil, err
		}
		t.State = State(state)
		out = append(out, t)
	}
	return out, rows.Err()
}

// TaskStates returns the state of each id; ids with no row get StateMissing.
func (s *Store) TaskStates(ctx context.Context, ids []int64) (map[int64]TaskState, error) {
	out := make(map[int64]TaskState, len(ids))
	if len(ids) == 0 {
		return out, nil
	}
	rows, err := s.lookups.Query(ctx, qTaskStates, ids)
	if err != nil {
		return nil, s.wrap("task states", err)
	}
	list, err := scanTaskStates(rows)
	if err != nil {
		return nil, s.wrap("task states", err)
	}
	for _, t := range list {
		out[t.TaskID] = t
	}
	for _, id := range ids {
		if _, ok := out[id]; !ok {
			out[id] = TaskState{TaskID: id, State: StateMissing}
		}
	}
	return out, nil
}

// InFlightTasks returns every RUNNING and YIELDED task, by task id: what a
// new leader reconciles with its slot table.
func (s *Store) InFlightTasks(ctx context.Context) ([]TaskState, error) {
	rows, err := s.pool.Query(ctx, qInFlightTasks)
	if err != nil {
		return nil, s.wrap("in-flight tasks", err)
	}
	list, err := scanTaskStates(rows)
	if err != nil {
		return nil, s.wrap("in-flight tasks", err)
	}
	return list, nil
}

// Outcomes of ResolveLost.
const (
	LostRequeued = "requeued"
	LostFailed   = "failed"
	LostTimedOut = "timed_out"
	LostSkipped  = "skipped"
)

// ResolveLost settles attempts whose node was lost (D13), fenced by term and
// by each attempt still RUNNING: never started → READY again ("requeued");
// started and past its deadline (times_up <= now) → TIMED_OUT ("timed_out");
// started with a retry left (retries < max_retries) → READY, retries+1
// ("requeued"); otherwise FAILED with processing_error = reason, which
// should name the lost node ("failed"). Anything else is "skipped". One
// LostResult per ref, in order.
func (s *Store) ResolveLost(ctx context.Context, term uint64, reason string, refs []Ref, now time.Time) ([]LostResult, error) {
	if len(refs) == 0 {
		return nil, nil
	}
	ids, attempts := refArrays(refs)
	got := map[Ref]string{}
	err := s.fencedOn(ctx, s.lookups, "resolve lost tasks", term, func(b *pgx.Batch) {
		b.Queue(qResolveLost, ids, attempts, now, reason).Query(func(rows pgx.Rows) error {
			var r Ref
			var outcome string
			_, err := pgx.ForEachRow(rows, []any{&r.TaskID, &r.Attempt, &outcome}, func() error {
				got[r] = outcome
				return nil
			})
			return err
		})
	})
	if err != nil {
		return nil, err
	}
	out := make([]LostResult, len(refs))
	for i, r := range refs {
		out[i] = LostResult{Ref: r, Outcome: LostSkipped}
		if o, ok := got[r]; ok {
			out[i].Outcome = o
			delete(got, r)
		}
	}
	return out, nil
}

// TimeOutTasks ends YIELDED tasks and RUNNING non-query tasks whose deadline
// passed (times_up <= now) as TIMED_OUT, failed, 'Canceling due to time out'
// (D10; query tasks are timed out by their node). Fenced by term.
func (s *Store) TimeOutTasks(ctx context.Context, term uint64, now time.Time) ([]Ref, error) {
	var out []Ref
	err := s.fenced(ctx, "time out tasks", term, func(b *pgx.Batch) {
		b.Queue(qTimeOutTasks, now).Query(func(rows pgx.Rows) error {
			var r Ref
			_, err := pgx.ForEachRow(rows, []any{&r.TaskID, &r.Attempt}, func() error {
				out = append(out, r)
				return nil
			})
			return err
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// PurgeHistory deletes finished tasks with processed < now −
// control.task_keep_duration, in fenced batches of 10000, never unfinished
// ones (D18), then records control.last_heavy_maintenance = now. It returns
// how many rows it deleted.
func (s *Store) PurgeHistory(ctx context.Context, term uint64, now time.Time) (int64, error) {
	var total int64
	for {
		var n int64
		err := s.fenced(ctx, "purge history", term, func(b *pgx.Batch) {
			b.Queue(qPurgeHistoryBatch, now, purgeBatch).Exec(func(ct pgconn.CommandTag) error {
				n = ct.RowsAffected()
				return nil
			})
		})
		if err != nil {
			return total, err
		}
		total += n
		if n < purgeBatch {
			break
		}
		if err := ctx.Err(); err != nil {
			return total, fmt.Errorf("pgstore: purge history: %w", err)
		}
	}
	err := s.fenced(ctx, "purge history", term, func(b *pgx.Batch) {
		b.Queue(qSetLastHeavyMaintenance, now)
	})
	if err != nil {
		return total, err
	}
	if total > 0 {
		s.log.Info("purged task history", "deleted", total)
	}
	return total, nil
}
