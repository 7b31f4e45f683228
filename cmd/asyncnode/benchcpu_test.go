package main

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/internal/proccpu"
)

func TestCPUPerTask(t *testing.T) {
	m := cpuMeter{nodes: func() []int { return []int{1, 2} }, postmaster: 9}
	before := cpuSample{node: 100, server: 1000, ok: true, calls: proccpu.Calls{Reads: 500, Writes: 700}, callsOK: true}
	after := cpuSample{node: 160, server: 1240, ok: true, calls: proccpu.Calls{Reads: 16000, Writes: 10500}, callsOK: true}
	// 60 ticks = 600 ms over 10,000 tasks = 60 µs per task; 240 ticks = 240 µs;
	// 15,500 reads and 9,800 writes over 10,000 tasks.
	require.Equal(t, " node_cpu_us_per_task=60 server_cpu_us_per_task=240 node_reads_per_task=1.55 node_writes_per_task=0.98", m.perTask(before, after, 10000))
	require.Empty(t, m.perTask(cpuSample{}, after, 10000), "no figure without a first sample")
	require.Empty(t, m.perTask(before, after, 0))
	noCalls := after
	noCalls.callsOK = false
	require.Equal(t, " node_cpu_us_per_task=60 server_cpu_us_per_task=240", m.perTask(before, noCalls, 10000), "no system calls when /proc/<pid>/io could not be read")
	m.postmaster = 0
	require.Equal(t, " node_cpu_us_per_task=60 node_reads_per_task=1.55 node_writes_per_task=0.98", m.perTask(before, after, 10000), "no server figure when the server is not measured")
	m.nodes = func() []int { return nil }
	m.postmaster = 9
	require.Equal(t, " server_cpu_us_per_task=240", m.perTask(before, after, 10000), "limit_bookkeeping: no nodes yet")
}
