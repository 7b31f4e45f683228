package main

import (
	"context"
	"runtime/debug"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/asyncnode/asyncnode/internal/gctune"
)

// TestGCTunerRunsUnlessGOGCIsSetOrHeadroomIsZero: `run` tunes the
// collector by default (GOGC rises above Go's 100 for this test's small
// heap, and is put back when the tuner stops); GOGC in the environment or
// --gc-headroom-mib 0 leave the collector as Go sets it.
func TestGCTunerRunsUnlessGOGCIsSetOrHeadroomIsZero(t *testing.T) {
	prev := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
	log := hclog.NewNullLogger()
	noEnv := func(string) string { return "" }

	stop, tuning := startGCTuner(context.Background(), 0, noEnv, log)
	stop()
	if tuning {
		t.Error("--gc-headroom-mib 0: the tuner runs")
	}
	stop, tuning = startGCTuner(context.Background(), 32, func(k string) string {
		if k == "GOGC" {
			return "100"
		}
		return ""
	}, log)
	stop()
	if tuning {
		t.Error("GOGC set: the tuner runs")
	}
	if got := gctune.Current(); got != 100 {
		t.Fatalf("GOGC is %d, want 100 untouched", got)
	}

	stop, tuning = startGCTuner(context.Background(), 1024, noEnv, log)
	if !tuning {
		stop()
		t.Fatal("defaults: the tuner does not run")
	}
	deadline := time.Now().Add(10 * time.Second)
	for gctune.Current() == 100 {
		if time.Now().After(deadline) {
			stop()
			t.Fatal("the tuner did not raise GOGC above 100 within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	stop()
	if got := gctune.Current(); got != 100 {
		t.Errorf("GOGC after the tuner stopped is %d, want 100 back", got)
	}
}
