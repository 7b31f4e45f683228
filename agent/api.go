package agent

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"sort"
	"time"

	"github.com/asyncnode/asyncnode/cluster"
	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/asyncnode/asyncnode/scheduler"
)

// StatusReport is the body of GET /v1/status.
type StatusReport struct {
	Node        string            `json:"node"`
	Incarnation string            `json:"incarnation"`
	Leader      string            `json:"leader"`
	LeaderAPI   string            `json:"leader_api"`
	Term        uint64            `json:"term"`
	Scheduler   scheduler.Status  `json:"scheduler"`
	Members     []MemberStatus    `json:"members"`
	Pools       []PoolStatus      `json:"pools"`
	Workers     LimitStatus       `json:"workers"`
	Queue       pgstore.Counts    `json:"queue"`
	Failures    []pgstore.Failure `json:"recent_failures"`
	Errors      []string          `json:"errors,omitempty"`
}

// MemberStatus is one cluster member with its running tasks.
type MemberStatus struct {
	cluster.Member
	Running  int  `json:"running"`
	Draining bool `json:"draining"`
	// Registered is true once the node announced itself through Raft (for
	// a restarted node, possibly its previous process): the leader gives
	// tasks only to registered nodes.
	Registered bool `json:"registered"`
}

// PoolStatus is one concurrency pool.
type PoolStatus struct {
	Name    string `json:"name"`
	Running int    `json:"running"`
	Limit   int    `json:"limit"`
}

// LimitStatus is control.workers against the worker slots in use.
type LimitStatus struct {
	Running int `json:"running"`
	Limit   int `json:"limit"`
}

func (a *Agent) registerAPI() {
	if a.cfg.Pprof {
		// Profiles of a live node (behind the API token when one is set).
		a.node.Handle("/debug/pprof/", http.HandlerFunc(pprof.Index))
		a.node.Handle("/debug/pprof/cmdline", http.HandlerFunc(pprof.Cmdline))
		a.node.Handle("/debug/pprof/profile", http.HandlerFunc(pprof.Profile))
		a.node.Handle("/debug/pprof/symbol", http.HandlerFunc(pprof.Symbol))
		a.node.Handle("/debug/pprof/trace", http.HandlerFunc(pprof.Trace))
	}
	cluster.HandlePost(a.node, assignedPath, a.handleAssigned)
	a.node.Handle("/v1/status", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		rep := a.Status(ctx)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(rep)
	}))
}

// Status gathers the node's view of the cluster. Errors reading the server
// database are reported inside the report, never with connection strings.
func (a *Agent) Status(ctx context.Context) StatusReport {
	rep := StatusReport{Node: a.cfg.NodeID, Incarnation: a.inc, Term: a.node.Term(), Scheduler: a.sched.Status()}
	rep.Leader, rep.LeaderAPI = a.node.Leader()
	counts := a.fsm.Counts()
	regs := a.fsm.Nodes()
	for _, m := range a.node.Members() {
		rep.Members = append(rep.Members, MemberStatus{Member: m, Running: counts.PerNode[m.ID], Draining: regs[m.ID].Draining,
			Registered: regs[m.ID].Incarnation != ""})
	}
	cfg, err := a.store.LoadConfig(ctx)
	if err != nil {
		rep.Errors = append(rep.Errors, "load config: "+err.Error())
	}
	rep.Workers = LimitStatus{Running: counts.Workers, Limit: cfg.Control.Workers}
	names := map[string]bool{}
	for p := range cfg.Pools {
		names[p] = true
	}
	for p := range counts.Pools {
		names[p] = true
	}
	for p := range names {
		rep.Pools = append(rep.Pools, PoolStatus{Name: p, Running: counts.Pools[p], Limit: cfg.PoolLimit(p)})
	}
	sort.Slice(rep.Pools, func(i, j int) bool { return rep.Pools[i].Name < rep.Pools[j].Name })
	if q, err := a.store.Counts(ctx); err != nil {
		rep.Errors = append(rep.Errors, "queue counts: "+err.Error())
	} else {
		rep.Queue = q
	}
	if f, err := a.store.RecentFailures(ctx, 10); err != nil {
		rep.Errors = append(rep.Errors, "recent failures: "+err.Error())
	} else {
		rep.Failures = f
	}
	return rep
}
