package executor

import (
	"context"
	"sync"
	"time"
)

// gate bounds how many of one target's connections short tasks use at
// once. A task passes the gate before it takes a connection from the
// target's pool and leaves it when it is done with the connection. At most
// base tasks are inside and younger than longAfter; a task that has been
// inside longer no longer counts, so long tasks each get their own
// connection (up to the pool's cap) while short ones keep reusing a few
// warm sessions.
//
// Why: a trivial task costs the target's backend about twice as much
// CPU when 64 sessions take turns on two cores as when 8 do (pgbench
// figures in docs/performance.md), and a pool hands a burst of short tasks
// as many sessions as there are tasks. Counting only young holders keeps
// the cap of --target-conns for long tasks, which need a session each.
type gate struct {
	base      int
	longAfter time.Duration
	now       func() time.Time

	mu      sync.Mutex
	young   []*pass   // holders younger than longAfter, oldest first
	waiters []*waiter // FIFO
	timer   *time.Timer
	timerAt time.Time // when timer fires; zero when not armed
}

// pass is one task's way through the gate; leave it exactly once.
type pass struct {
	g     *gate
	since time.Time
}

type waiter struct {
	ready chan struct{} // closed once p is set
	p     *pass
}

func newGate(base int, longAfter time.Duration, now func() time.Time) *gate {
	return &gate{base: base, longAfter: longAfter, now: now}
}

// enter waits until the task may take a connection, or until ctx ends (it
// then returns ctx's error and holds nothing).
func (g *gate) enter(ctx context.Context) (*pass, error) {
	g.mu.Lock()
	g.ageLocked()
	if len(g.young) < g.base && len(g.waiters) == 0 {
		p := g.admitLocked()
		g.mu.Unlock()
		return p, nil
	}
	w := &waiter{ready: make(chan struct{})}
	g.waiters = append(g.waiters, w)
	g.armLocked()
	g.mu.Unlock()

	select {
	case <-w.ready:
		return w.p, nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	if w.p != nil {
		// Admitted while ctx ended: hand the place on.
		g.mu.Unlock()
		w.p.leave()
		return nil, ctx.Err()
	}
	for i, x := range g.waiters {
		if x == w {
			g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
			break
		}
	}
	g.mu.Unlock()
	return nil, ctx.Err()
}

// held restarts p's clock once its task has a connection. A task counts
// from its entry while it waits for a connection (so tasks stuck
// connecting to a slow or unreachable target stop holding the others back
// after longAfter) and again from the moment it has one: opening a
// connection is not running a long task, and a burst of cold connects must
// not let every task in.
func (p *pass) held() {
	g := p.g
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropLocked(p)
	p.since = g.now()
	g.young = append(g.young, p)
}

// leave gives the place back.
func (p *pass) leave() {
	g := p.g
	g.mu.Lock()
	defer g.mu.Unlock()
	g.dropLocked(p)
	g.ageLocked()
	g.wakeLocked()
}

// dropLocked removes p from the young holders, if it is one.
func (g *gate) dropLocked(p *pass) {
	for i, x := range g.young {
		if x == p {
			g.young = append(g.young[:i], g.young[i+1:]...)
			return
		}
	}
}

// admitLocked lets one more task in.
func (g *gate) admitLocked() *pass {
	p := &pass{g: g, since: g.now()}
	g.young = append(g.young, p)
	return p
}

// ageLocked drops holders that became long from the young ones.
func (g *gate) ageLocked() {
	now := g.now()
	n := 0
	for n < len(g.young) && now.Sub(g.young[n].since) >= g.longAfter {
		n++
	}
	if n > 0 {
		g.young = append(g.young[:0], g.young[n:]...)
	}
}

// wakeLocked admits waiters while there is room, then arms the timer for
// the next holder that becomes long if some still wait.
func (g *gate) wakeLocked() {
	for len(g.waiters) > 0 && len(g.young) < g.base {
		w := g.waiters[0]
		g.waiters[0] = nil
		g.waiters = g.waiters[1:]
		w.p = g.admitLocked()
		close(w.ready)
	}
	g.armLocked()
}

// armLocked makes sure the timer fires when the oldest young holder turns
// long, while tasks wait.
func (g *gate) armLocked() {
	if len(g.waiters) == 0 || len(g.young) == 0 {
		return
	}
	at := g.young[0].since.Add(g.longAfter)
	if !g.timerAt.IsZero() && !g.timerAt.After(at) {
		return
	}
	g.timerAt = at
	d := at.Sub(g.now())
	if g.timer == nil {
		g.timer = time.AfterFunc(d, g.tick)
	} else {
		g.timer.Reset(d)
	}
}

// tick runs when a young holder may have turned long.
func (g *gate) tick() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.timerAt = time.Time{}
	g.ageLocked()
	g.wakeLocked()
}

// stats reports the young holders and the waiting tasks.
func (g *gate) stats() (young, waiting int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.young), len(g.waiters)
}
