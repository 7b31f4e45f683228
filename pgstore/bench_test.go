package pgstore_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/stretchr/testify/require"
)

// BenchmarkClaimFinish measures the hot path of the cluster on 1000-task
// batches: ClaimTasks (1000 slots over 10 nodes), StartTasks and FinishTasks
// per node. The push of each batch is not timed. history is the number of
// finished rows present (D18: it must not matter).
//
//	go test ./pgstore/ -run XXX -bench ClaimFinish -benchtime 20x
func BenchmarkClaimFinish(b *testing.B) {
	for _, history := range []int{0, 1_000_000} {
		b.Run(fmt.Sprintf("history=%d", history), func(b *testing.B) { benchClaimFinish(b, history) })
	}
}

func benchClaimFinish(b *testing.B, history int) {
	const batch, nodes = 1000, 10
	ctx := context.Background()
	dsn := h.DB(b)
	s, err := pgstore.Open(ctx, dsn, nil)
	require.NoError(b, err)
	defer s.Close()
	c := connect(b, dsn)
	exec(b, c, `UPDATE async.target SET max_concurrency = $1 WHERE target = 'SELF'`, batch)
	if history > 0 {
		exec(b, c, `INSERT INTO async.task (target, concurrency_pool, query, consumed, processed, finish_status, failed)
		            SELECT 'SELF', 'SELF', 'select 0', now(), now(), 'FINISHED', false FROM generate_series(1, $1::int)`, history)
		exec(b, c, `VACUUM ANALYZE async.task`)
	}
	l, err := s.TakeLeadership(ctx, 1, "bench", "bench")
	require.NoError(b, err)
	defer func() { _ = l.Release(ctx) }()
	slotNodes := make([]string, batch)
	for i := range slotNodes {
		slotNodes[i] = fmt.Sprintf("node%d", i%nodes)
	}

	var claimT, startT, finishT time.Duration
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		push(b, c, "SELF", batch, "select 1")
		b.StartTimer()

		t0 := time.Now()
		cl, err := s.ClaimTasks(ctx, pgstore.ClaimRequest{Term: 1, Slots: slotNodes, Now: time.Now()})
		if err != nil || len(cl) != batch {
			b.Fatalf("claim: %d tasks, %v", len(cl), err)
		}
		byNode := refsByNode(cl)
		t1 := time.Now()
		for node, rs := range byNode {
			st, err := s.StartTasks(ctx, node, rs)
			if err != nil || len(st) != len(rs) {
				b.Fatalf("start: %d of %d, %v", len(st), len(rs), err)
			}
		}
		t2 := time.Now()
		for node, rs := range byNode {
			f, err := s.FinishTasks(ctx, node, finished(rs))
			if err != nil || len(f) != len(rs) || !f[0].Applied {
				b.Fatalf("finish: %v", err)
			}
		}
		t3 := time.Now()
		claimT += t1.Sub(t0)
		startT += t2.Sub(t1)
		finishT += t3.Sub(t2)
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(n*batch/(claimT+startT+finishT).Seconds(), "tasks/s")
	b.ReportMetric(float64(claimT.Microseconds())/n/1000, "claim-ms/batch")
	b.ReportMetric(float64(startT.Microseconds())/n/1000, "start-ms/batch")
	b.ReportMetric(float64(finishT.Microseconds())/n/1000, "finish-ms/batch")
}
