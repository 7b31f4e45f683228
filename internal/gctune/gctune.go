// Package gctune sets the Go garbage collector's target (GOGC) from the
// live heap, so that a process whose live heap is small but which
// allocates at a high rate does not collect every few megabytes.
//
// With Go's default GOGC of 100 a collection starts once the heap has
// grown by the live heap's size. A node's live heap under load is a few
// megabytes while it allocates a few kilobytes per task, so at thousands
// of tasks a second it collected every 40 to 62 ms. The tuner lets the
// heap grow by Headroom above the live heap instead: GOGC = 100 ×
// Headroom / live heap, never below 100 (Go's default, which large heaps
// keep) and never above MaxPercent. The memory this costs is bounded by
// Headroom (plus the default's own growth for large heaps), and a memory
// limit (GOMEMLIMIT) still applies on top of it.
package gctune

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Defaults.
const (
	// DefaultHeadroom is how far the heap may grow above the live heap
	// before a collection, at least.
	DefaultHeadroom = 32 << 20
	// MinPercent is the lowest GOGC the tuner sets: Go's default.
	MinPercent = 100
	// MaxPercent is the highest GOGC the tuner sets, for a nearly empty
	// heap.
	MaxPercent = 1000
	// DefaultInterval is how often the live heap is read.
	DefaultInterval = time.Second
)

// Percent is the GOGC for a live heap of live bytes that lets the heap grow
// by headroom bytes before the next collection, within [MinPercent,
// MaxPercent].
func Percent(live, headroom uint64) int {
	if live == 0 {
		return MaxPercent
	}
	p := headroom * 100 / live
	switch {
	case p < MinPercent:
		return MinPercent
	case p > MaxPercent:
		return MaxPercent
	}
	return int(p)
}

// Tuner adjusts GOGC while Run runs.
type Tuner struct {
	// Headroom in bytes; see Percent. Must be positive.
	Headroom uint64
	// Interval between readings of the live heap; DefaultInterval if zero.
	Interval time.Duration
	// OnChange, if set, is called after each change of GOGC (from the
	// goroutine running Run).
	OnChange func(live uint64, percent int)
}

// newSamples is what read reads: the heap marked live by the last
// collection and the GOGC in force.
func newSamples() []metrics.Sample {
	return []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/gogc:percent"}}
}

// read reads s (newSamples).
func read(s []metrics.Sample) (live uint64, percent int) {
	metrics.Read(s)
	if s[0].Value.Kind() == metrics.KindUint64 {
		live = s[0].Value.Uint64()
	}
	if s[1].Value.Kind() == metrics.KindUint64 {
		// Off (GOGC=off) reads as -1 converted to uint64.
		percent = int(int64(s[1].Value.Uint64()))
	}
	return live, percent
}

// Current is the GOGC in force (negative: collection is off).
func Current() int {
	_, p := read(newSamples())
	return p
}

// Run sets GOGC from the live heap every Interval until ctx ends, then puts
// back the GOGC the process had when Run started. It changes GOGC only
// when the new value differs from the one in force by more than a tenth,
// so that the live heap's small swings from one collection to the next do
// not move it.
func (t *Tuner) Run(ctx context.Context) {
	interval := t.Interval
	if interval <= 0 {
		interval = DefaultInterval
	}
	s := newSamples()
	_, initial := read(s)
	if initial <= 0 {
		// Collection is off (GOGC=off: not ours to turn on), or the
		// runtime did not report GOGC (0): leave it as it is.
		return
	}
	defer debug.SetGCPercent(initial)
	current := initial
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		live, _ := read(s)
		if p := Percent(live, t.Headroom); 10*abs(p-current) > current {
			debug.SetGCPercent(p)
			current = p
			if t.OnChange != nil {
				t.OnChange(live, p)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}
