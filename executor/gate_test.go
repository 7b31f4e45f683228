package executor

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// fakeClock is a settable clock for gate tests.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// enterAsync enters g in a goroutine; the pass (or error) arrives on the
// returned channel.
func enterAsync(ctx context.Context, g *gate) <-chan *pass {
	ch := make(chan *pass, 1)
	go func() {
		p, err := g.enter(ctx)
		if err != nil {
			p = nil
		}
		ch <- p
	}()
	return ch
}

// recv returns what enterAsync delivered, failing the test after 10 s.
func recv(t *testing.T, ch <-chan *pass) *pass {
	t.Helper()
	select {
	case p := <-ch:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("the task never got through the gate")
		return nil
	}
}

// waitWaiting waits until n tasks wait at g.
func waitWaiting(t *testing.T, g *gate, n int) {
	t.Helper()
	require.Eventually(t, func() bool { _, w := g.stats(); return w == n }, 10*time.Second, time.Millisecond,
		"tasks waiting at the gate")
}

// The gate's own timer must not fire during the fake-clock tests.
const neverLong = time.Hour

func TestGateAdmitsBaseThenWaitsForALeave(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	g := newGate(2, neverLong, clk.now)
	ctx := context.Background()
	a, err := g.enter(ctx)
	require.NoError(t, err)
	b, err := g.enter(ctx)
	require.NoError(t, err)
	c := enterAsync(ctx, g)
	waitWaiting(t, g, 1)
	select {
	case <-c:
		t.Fatal("a third task passed a gate of 2 while both places were held")
	default:
	}
	a.leave()
	pc := recv(t, c)
	require.NotNil(t, pc)
	young, waiting := g.stats()
	require.Equal(t, 2, young)
	require.Equal(t, 0, waiting)
	b.leave()
	pc.leave()
	young, _ = g.stats()
	require.Equal(t, 0, young)
}

func TestGateLongHoldersStopCounting(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	g := newGate(1, neverLong, clk.now)
	ctx := context.Background()
	a, err := g.enter(ctx)
	require.NoError(t, err)
	b := enterAsync(ctx, g)
	waitWaiting(t, g, 1)
	clk.add(neverLong)
	g.tick() // what the timer does when a holder turns long
	pb := recv(t, b)
	require.NotNil(t, pb, "a long holder must not keep the next task out")
	// a is long now: its leaving frees no place for short tasks.
	c := enterAsync(ctx, g)
	waitWaiting(t, g, 1)
	a.leave()
	young, waiting := g.stats()
	require.Equal(t, 1, young)
	require.Equal(t, 1, waiting, "a long holder's leave admitted a task beyond the young limit")
	pb.leave()
	pc := recv(t, c)
	require.NotNil(t, pc)
	pc.leave()
}

func TestGateIsFirstComeFirstServed(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	g := newGate(1, neverLong, clk.now)
	ctx := context.Background()
	a, err := g.enter(ctx)
	require.NoError(t, err)
	b := enterAsync(ctx, g)
	waitWaiting(t, g, 1)
	c := enterAsync(ctx, g)
	waitWaiting(t, g, 2)
	a.leave()
	pb := recv(t, b)
	require.NotNil(t, pb)
	select {
	case <-c:
		t.Fatal("the later task passed first")
	default:
	}
	pb.leave()
	pc := recv(t, c)
	require.NotNil(t, pc)
	pc.leave()
}

func TestGateCancelledWaiterHoldsNothing(t *testing.T) {
	clk := &fakeClock{t: time.Unix(0, 0)}
	g := newGate(1, neverLong, clk.now)
	a, err := g.enter(context.Background())
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	b := enterAsync(ctx, g)
	waitWaiting(t, g, 1)
	cancel()
	require.Nil(t, recv(t, b))
	_, waiting := g.stats()
	require.Equal(t, 0, waiting)
	a.leave()
	young, _ := g.stats()
	require.Equal(t, 0, young, "a cancelled waiter was admitted")
	// A leave admits the first waiter and the place is held until it leaves.
	p, err := g.enter(context.Background())
	require.NoError(t, err)
	g.mu.Lock()
	w := &waiter{ready: make(chan struct{})}
	g.waiters = append(g.waiters, w)
	g.mu.Unlock()
	p.leave() // admits w
	young, waiting = g.stats()
	require.Equal(t, 1, young)
	require.Equal(t, 0, waiting)
	w.p.leave()
	young, _ = g.stats()
	require.Equal(t, 0, young)
}

// With the real clock, a task waiting behind a holder that runs long gets
// in once that holder has held its place for longAfter, without any leave.
func TestGateTimerAdmitsBehindALongHolder(t *testing.T) {
	g := newGate(1, 30*time.Millisecond, time.Now)
	a, err := g.enter(context.Background())
	require.NoError(t, err)
	defer a.leave()
	pb := recv(t, enterAsync(context.Background(), g))
	require.NotNil(t, pb, "the gate's timer never let the waiting task in")
	pb.leave()
}
