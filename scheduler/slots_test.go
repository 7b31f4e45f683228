package scheduler

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestBuildSlots(t *testing.T) {
	t.Parallel()
	n := func(id string, max int) NodeInfo { return NodeInfo{ID: id, MaxTasks: max, Alive: true} }
	for _, tc := range []struct {
		name  string
		free  int
		nodes []NodeInfo
		held  map[string]int
		want  []string
	}{
		{name: "no nodes", free: 3, want: nil},
		{name: "one node takes every slot", free: 3, nodes: []NodeInfo{n("a", 0)}, want: []string{"a", "a", "a"}},
		{name: "equal load goes by id, then round robin", free: 5,
			nodes: []NodeInfo{n("c", 0), n("a", 0), n("b", 0)}, want: []string{"a", "b", "c", "a", "b"}},
		{name: "the least loaded first until loads meet", free: 6,
			nodes: []NodeInfo{n("a", 0), n("b", 0), n("c", 0)}, held: map[string]int{"a": 3, "b": 1},
			want: []string{"c", "b", "c", "b", "c", "a"}},
		{name: "a node at its cap is skipped; slots stop when every cap is reached", free: 6,
			nodes: []NodeInfo{n("a", 2), n("b", 3)}, held: map[string]int{"b": 1},
			want: []string{"a", "a", "b", "b"}},
		{name: "a full node takes nothing", free: 2,
			nodes: []NodeInfo{n("a", 1), n("b", 0)}, held: map[string]int{"a": 1, "b": 5}, want: []string{"b", "b"}},
		{name: "dead and draining nodes take nothing", free: 2,
			nodes: []NodeInfo{{ID: "a"}, {ID: "b", Alive: true, Draining: true}, n("c", 0)}, want: []string{"c", "c"}},
		{name: "nobody has room", free: 2, nodes: []NodeInfo{n("a", 1)}, held: map[string]int{"a": 1}, want: nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := buildSlots(tc.free, tc.nodes, tc.held)
			if len(tc.want) == 0 {
				require.Empty(t, got)
				return
			}
			require.Equal(t, tc.want, got)
		})
	}
}
