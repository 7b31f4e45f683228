package pgstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
)

// Leadership timings.
const (
	takeoverWait   = 5 * time.Second       // how long to wait for a terminated stale holder
	takeoverPoll   = 50 * time.Millisecond // lock retry interval meanwhile
	leaderPing     = time.Second           // liveness check of the dedicated connection
	leaderPingWait = 3 * time.Second       // a ping slower than this counts as lost
)

// Leadership is a held session advisory lock (control.advisory_mutex_id) on a
// dedicated connection, with this leader's term recorded in async.leader.
type Leadership struct {
	term uint64
	key  int64
	pid  uint32
	log  hclog.Logger

	mu   sync.Mutex // guards conn
	conn *pgx.Conn

	lost     chan struct{}
	lostOnce sync.Once
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

// TakeLeadership takes the server database's leader lock for this cluster's
// leader of Raft term term, on a dedicated connection (not from the pool).
//
// If another session holds the lock and async.leader shows it is this
// cluster's own stale leader (same clusterID, holder_pid = that session,
// recorded term <= term), it terminates that session and retries for up to
// about 5 s. Otherwise it returns ErrLockHeld, naming the holder's pid and
// application_name. Once locked it records term, node and clusterID in
// async.leader (only if no newer term of the same cluster is recorded, else
// ErrStaleTerm; a different cluster takes over with a larger fencing token,
// see Leadership.Term) and
// control.pid / running_since / leader_node / leader_term.
func (s *Store) TakeLeadership(ctx context.Context, term uint64, node, clusterID string) (*Leadership, error) {
	t, err := termArg(term)
	if err != nil {
		return nil, err
	}
	conn, err := s.dedicated(ctx, "asyncnode leader "+node)
	if err != nil {
		return nil, err
	}
	l, err := s.takeLeadership(ctx, conn, t, node, clusterID)
	if err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	go l.watch()
	s.log.Info("took leadership of the server database", "term", term, "leader", node, "lock", l.key, "pid", l.pid)
	return l, nil
}

func (s *Store) takeLeadership(ctx context.Context, conn *pgx.Conn, term int64, node, clusterID string) (*Leadership, error) {
	var key int64
	if err := conn.QueryRow(ctx, qLeaderLockKey).Scan(&key); err != nil {
		return nil, s.wrap("take leadership: read control.advisory_mutex_id", err)
	}
	start := time.Now()
	var deadline time.Time
	terminated := int32(0)
	for {
		var ok bool
		if err := conn.QueryRow(ctx, qLeaderTryLock, key).Scan(&ok); err != nil {
			return nil, s.wrap("take leadership: lock", err)
		}
		if ok {
			break
		}
		var pid, holderPid int32
		var app, cluster string
		var recorded int64
		err := conn.QueryRow(ctx, qLeaderLockHolder, key).Scan(&pid, &app, &cluster, &holderPid, &recorded)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			// Released meanwhile: try again, for a while.
			if time.Since(start) > takeoverWait {
				return nil, fmt.Errorf("%w: advisory lock %d is held, but its holder cannot be found in pg_locks", ErrLockHeld, key)
			}
		case err != nil:
			return nil, s.wrap("take leadership: find lock holder", err)
		case clusterID != "" && cluster == clusterID && holderPid == pid && recorded <= term:
			if terminated != pid {
				s.log.Warn("terminating the session of a stale leader of this cluster",
					"pid", pid, "application_name", app, "recorded_term", recorded, "term", term)
				if _, err := conn.Exec(ctx, qLeaderTerminate, pid); err != nil {
					return nil, s.wrap(fmt.Sprintf("take leadership: terminate stale leader session pid %d", pid), err)
				}
				terminated = pid
				deadline = time.Now().Add(takeoverWait)
			}
		case clusterID != "" && cluster == clusterID && holderPid == pid:
			return nil, fmt.Errorf("pgstore: take leadership: %w (term %d recorded by pid %d, ours is %d)",
				ErrStaleTerm, recorded, pid, term)
		default:
			return nil, fmt.Errorf("%w: session pid %d (application_name %q) holds advisory lock %d",
				ErrLockHeld, pid, app, key)
		}
		if !deadline.IsZero() && time.Now().After(deadline) {
			return nil, fmt.Errorf("pgstore: take leadership: the stale leader session pid %d still holds advisory lock %d after %s",
				terminated, key, takeoverWait)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pgstore: take leadership: %w", ctx.Err())
		case <-time.After(takeoverPoll):
		}
	}

	// Locked: record the term, unless a newer one already took over.
	var recorded int64
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, qLeaderRecord, term, node, clusterID).Scan(&recorded); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				var cur int64
				if err := tx.QueryRow(ctx, qLeaderCurrentTerm).Scan(&cur); err != nil {
					return err
				}
				return fmt.Errorf("%w: the server database records term %d, ours is %d", ErrStaleTerm, cur, term)
			}
			return err
		}
		_, err := tx.Exec(ctx, qLeaderRecordControl, term, node)
		return err
	})
	if err != nil {
		_, _ = conn.Exec(context.WithoutCancel(ctx), qLeaderUnlock, key)
		if errors.Is(err, ErrStaleTerm) {
			return nil, fmt.Errorf("pgstore: take leadership: %w", err)
		}
		return nil, s.wrap("take leadership: record term", err)
	}
	if recorded != term {
		s.log.Info("fencing token differs from the Raft term (the server database was led by another cluster before)",
			"raft_term", term, "token", recorded)
	}
	return &Leadership{
		term: uint64(recorded), key: key, pid: conn.PgConn().PID(), log: s.log, conn: conn,
		lost: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{}),
	}, nil
}

// Term is the fencing token of this leadership: every leader write must
// carry it (ClaimRequest.Term and the term arguments). It equals the Raft
// term unless the server database was led by another cluster before, in
// which case it is larger (see migration 0005).
func (l *Leadership) Term() uint64 { return l.term }

// PID is the backend pid of the dedicated connection holding the lock.
func (l *Leadership) PID() uint32 { return l.pid }

// Lost is closed when the dedicated connection dies (checked by a ping every
// second) or after Release: the lock is no longer held.
func (l *Leadership) Lost() <-chan struct{} { return l.lost }

func (l *Leadership) markLost() { l.lostOnce.Do(func() { close(l.lost) }) }

func (l *Leadership) watch() {
	defer close(l.done)
	tick := time.NewTicker(leaderPing)
	defer tick.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-tick.C:
		}
		l.mu.Lock()
		ctx, cancel := context.WithTimeout(context.Background(), leaderPingWait)
		err := l.conn.Ping(ctx)
		cancel()
		if err != nil {
			_ = l.conn.Close(context.Background())
		}
		l.mu.Unlock()
		if err != nil {
			l.log.Error("lost the server database leader lock connection", "term", l.term, "error", err)
			l.markLost()
			return
		}
	}
}

// Release unlocks and closes the dedicated connection; Lost is closed. It
// is safe to call more than once and after the connection was lost.
func (l *Leadership) Release(ctx context.Context) error {
	l.stopOnce.Do(func() { close(l.stop) })
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.markLost()
	if l.conn.IsClosed() {
		return nil
	}
	_, err := l.conn.Exec(ctx, qLeaderUnlock, l.key)
	cerr := l.conn.Close(ctx)
	if err != nil {
		return fmt.Errorf("pgstore: release leadership: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("pgstore: release leadership: %w", cerr)
	}
	return nil
}
