package gctune

import (
	"context"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		live, headroom uint64
		want           int
	}{
		{0, 32 * mib, MaxPercent},
		{16 << 10, 32 * mib, MaxPercent}, // nearly empty heap: capped
		{6 * mib, 32 * mib, 533},         // a node under load
		{32 * mib, 32 * mib, MinPercent}, // headroom = live heap: Go's default
		{1 << 30, 32 * mib, MinPercent},  // large heap: never below the default
		{10 * mib, 25 * mib, 250},
	} {
		if got := Percent(c.live, c.headroom); got != c.want {
			t.Errorf("Percent(%d, %d) = %d, want %d", c.live, c.headroom, got, c.want)
		}
	}
}

// TestRunSetsFromTheLiveHeapAndRestores: with a live heap of a few
// megabytes and a large headroom, Run raises GOGC to Percent of the live
// heap it read, and puts the previous GOGC back when its context ends.
func TestRunSetsFromTheLiveHeapAndRestores(t *testing.T) {
	prev := debug.SetGCPercent(MinPercent)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
	keep := make([]byte, 4<<20)
	for i := range keep {
		keep[i] = byte(i)
	}
	runtime.GC()

	type change struct {
		live    uint64
		percent int
	}
	changes := make(chan change, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	tu := &Tuner{Headroom: 256 << 20, Interval: 10 * time.Millisecond,
		OnChange: func(live uint64, p int) { changes <- change{live, p} }}
	go func() { defer close(done); tu.Run(ctx) }()

	var c change
	select {
	case c = <-changes:
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("Run did not change GOGC within 10s")
	}
	if c.live < 4<<20 {
		t.Errorf("live heap read as %d bytes, below the 4 MiB kept alive", c.live)
	}
	if want := Percent(c.live, tu.Headroom); c.percent != want || c.percent <= MinPercent {
		t.Errorf("GOGC set to %d for a live heap of %d bytes, want Percent = %d (above %d)", c.percent, c.live, want, MinPercent)
	}
	if got := Current(); got != c.percent {
		t.Errorf("GOGC in force is %d, want %d", got, c.percent)
	}
	cancel()
	<-done
	if got := Current(); got != MinPercent {
		t.Errorf("GOGC after Run returned is %d, want the previous %d", got, MinPercent)
	}
	runtime.KeepAlive(keep)
}

// TestRunLeavesCollectionOff: with GOGC=off, Run returns at once and
// leaves it off.
func TestRunLeavesCollectionOff(t *testing.T) {
	prev := debug.SetGCPercent(-1)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
	called := false
	tu := &Tuner{Headroom: 256 << 20, Interval: time.Millisecond, OnChange: func(uint64, int) { called = true }}
	done := make(chan struct{})
	go func() { defer close(done); tu.Run(context.Background()) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run kept running with collection off")
	}
	if called {
		t.Error("Run changed GOGC while collection was off")
	}
	if got := debug.SetGCPercent(-1); got >= 0 {
		t.Errorf("GOGC is %d after Run, want collection still off", got)
	}
}
