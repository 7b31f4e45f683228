package fsm

import (
	"bytes"
	"io"
	"math/rand/v2"
	"slices"
	"strconv"
	"testing"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
)

type recorder struct {
	assigned []Assignment
	revoked  []Assignment
	released []Ref
}

func (r *recorder) Assigned(a []Assignment) { r.assigned = append(r.assigned, a...) }
func (r *recorder) Revoked(a []Assignment)  { r.revoked = append(r.revoked, a...) }
func (r *recorder) Released(x []Ref)        { r.released = append(r.released, x...) }

func apply(t *testing.T, f *FSM, typ MessageType, v any) Result {
	t.Helper()
	b, err := Encode(typ, v)
	require.NoError(t, err)
	out := f.Apply(&raft.Log{Index: 1, Data: b})
	raw, ok := out.([]byte)
	require.True(t, ok, "apply returned %T: %v", out, out)
	res, err := DecodeResult(raw)
	require.NoError(t, err)
	return res
}

func TestEveryTypeHasHandler(t *testing.T) {
	for _, typ := range []MessageType{MsgAssign, MsgRelease, MsgRevoke, MsgRegister, MsgForget, MsgSetID, MsgReleaseAssign, MsgReleaseAssignPacked} {
		_, ok := handlers[typ]
		require.True(t, ok, "no handler for type %d", typ)
	}
	f := New(nil)
	out := f.Apply(&raft.Log{Data: []byte{250, '{', '}'}})
	require.ErrorIs(t, out.(error), ErrUnknownType)
}

// A malformed entry is refused and changes nothing; the FSM keeps working.
func TestMalformedEntryIsRejected(t *testing.T) {
	f := New(nil)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"}}})
	for _, data := range [][]byte{{byte(MsgAssign), '{', 'x'}, {byte(MsgRelease), '[', ']'}, {byte(MsgRegister), '"'}} {
		out := f.Apply(&raft.Log{Index: 7, Data: data})
		err, ok := out.(error)
		require.True(t, ok, "got %v", out)
		require.ErrorIs(t, err, ErrMalformed)
	}
	require.Equal(t, 1, f.Counts().Total)
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}}}})
	require.Equal(t, 0, f.Counts().Total)
}

func TestAssignReleaseCounts(t *testing.T) {
	rec := &recorder{}
	f := New(rec)
	res := apply(t, f, MsgAssign, Assign{Term: 2, Items: []Assignment{
		{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"},
		{TaskID: 2, Attempt: 1, Node: "b", Pool: "p"},
		{TaskID: 3, Attempt: 1, Pool: "q", External: true},
	}})
	require.Equal(t, 3, res.Changed)
	require.Empty(t, res.Rejected)
	c := f.Counts()
	require.Equal(t, 2, c.Workers, "external tasks hold no worker slot")
	require.Equal(t, map[string]int{"p": 2, "q": 1}, c.Pools)
	require.Equal(t, map[string]int{"a": 1, "b": 1}, c.PerNode)
	require.Len(t, rec.assigned, 3)

	// A task already held cannot be assigned again (one attempt at a time).
	res = apply(t, f, MsgAssign, Assign{Term: 2, Items: []Assignment{{TaskID: 1, Attempt: 2, Node: "b", Pool: "p"}}})
	require.Equal(t, []Ref{{1, 2}}, res.Rejected)
	// An older term cannot assign.
	res = apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 9, Attempt: 1, Node: "b", Pool: "p"}}})
	require.Equal(t, []Ref{{9, 1}}, res.Rejected)
	require.Equal(t, 3, f.Counts().Total)

	// Release with a wrong attempt is fenced out.
	res = apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 7}}}})
	require.Equal(t, 0, res.Changed)
	res = apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}}, {Ref: Ref{3, 1}}}})
	require.Equal(t, 2, res.Changed)
	c = f.Counts()
	require.Equal(t, 1, c.Workers)
	require.Equal(t, map[string]int{"p": 1}, c.Pools)
	require.Equal(t, []Ref{{1, 1}, {3, 1}}, rec.released)
}

func TestYieldHoldsPoolNotWorker(t *testing.T) {
	f := New(nil)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"}}})
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}, Yielded: true, HoldPool: true}}})
	c := f.Counts()
	require.Equal(t, 0, c.Workers)
	require.Equal(t, map[string]int{"p": 1}, c.Pools)
	a, ok := f.Get(1)
	require.True(t, ok)
	require.True(t, a.Yielded)
	// Finishing the yielded task frees the pool slot.
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}}}})
	require.Equal(t, 0, f.Counts().Total)
	require.Empty(t, f.Counts().Pools)
}

// A non-query task handed out by get_tasks on an asynchronous target that
// tracks yielded tasks keeps its pool slot (it never held a worker slot).
func TestYieldedExternalHoldsPool(t *testing.T) {
	f := New(nil)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 1, Attempt: 1, Pool: "ext", External: true}}})
	require.Equal(t, 0, f.Counts().Workers)
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}, Yielded: true, HoldPool: true}}})
	c := f.Counts()
	require.Equal(t, 0, c.Workers)
	require.Equal(t, map[string]int{"ext": 1}, c.Pools)
	a, ok := f.Get(1)
	require.True(t, ok)
	require.True(t, a.Yielded)
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}}}})
	require.Empty(t, f.Counts().Pools)
}

func TestRevokeKeepsCountingUntilRelease(t *testing.T) {
	rec := &recorder{}
	f := New(rec)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"}}})
	res := apply(t, f, MsgRevoke, Revoke{Items: []Ref{{1, 1}, {1, 2}, {5, 1}}})
	require.Equal(t, 1, res.Changed)
	require.Len(t, rec.revoked, 1)
	require.Equal(t, 1, f.Counts().Workers, "a revoked attempt still holds its slot until its node releases it")
	res = apply(t, f, MsgRevoke, Revoke{Items: []Ref{{1, 1}}})
	require.Equal(t, 0, res.Changed, "revoke is idempotent")
}

// RevokedTaskIDs lists the revoked attempts still holding slots, and only
// those: the leader keeps them out of its claims.
func TestRevokedTaskIDs(t *testing.T) {
	f := New(nil)
	require.Empty(t, f.RevokedTaskIDs())
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{
		{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"}, {TaskID: 2, Attempt: 1, Node: "a", Pool: "p"},
		{TaskID: 3, Attempt: 1, Pool: "x", External: true}}})
	apply(t, f, MsgRevoke, Revoke{Items: []Ref{{3, 1}, {1, 1}, {2, 9}}})
	ids := f.RevokedTaskIDs()
	slices.Sort(ids)
	require.Equal(t, []int64{1, 3}, ids)
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{1, 1}}}})
	require.Equal(t, []int64{3}, f.RevokedTaskIDs())
	require.Equal(t, []int64{3}, restoredCopy(t, f).RevokedTaskIDs())
}

func TestSnapshotRestore(t *testing.T) {
	f := New(nil)
	apply(t, f, MsgRegister, Register{Node: "a", Incarnation: "i1"})
	apply(t, f, MsgSetID, SetID{ClusterID: "c1"})
	require.Equal(t, 0, apply(t, f, MsgSetID, SetID{ClusterID: "c2"}).Changed, "the cluster id is set once")
	apply(t, f, MsgAssign, Assign{Term: 3, Items: []Assignment{
		{TaskID: 1, Attempt: 1, Node: "a", Incarnation: "i1", Pool: "p", Deadline: 1000},
		{TaskID: 2, Attempt: 4, Pool: "q", External: true, Deadline: 2000},
		{TaskID: 3, Attempt: 1, Node: "a", Incarnation: "i1", Pool: "p"},
	}})
	apply(t, f, MsgRelease, Release{Items: []ReleaseItem{{Ref: Ref{3, 1}, Yielded: true, HoldPool: true}}})
	apply(t, f, MsgRevoke, Revoke{Items: []Ref{{1, 1}}})

	g := restoredCopy(t, f)
	require.Equal(t, f.Assignments(), g.Assignments())
	require.Equal(t, f.Counts(), g.Counts())
	require.Equal(t, f.Nodes(), g.Nodes())
	require.Equal(t, "c1", g.ClusterID())
	// The restored term still fences older leaders.
	res := apply(t, g, MsgAssign, Assign{Term: 2, Items: []Assignment{{TaskID: 7, Attempt: 1, Pool: "p"}}})
	require.Len(t, res.Rejected, 1)

	require.Error(t, g.Restore(io.NopCloser(bytes.NewReader([]byte(`{"version":99}`)))))
	require.Equal(t, f.Assignments(), g.Assignments(), "a failed restore leaves state untouched")
}

type memSink struct{ bytes.Buffer }

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { return nil }
func (m *memSink) Close() error  { return nil }

// indexRecorder records Applied() as seen from inside Observer calls.
type indexRecorder struct {
	f    *FSM
	seen []uint64
}

func (r *indexRecorder) Assigned([]Assignment) { r.seen = append(r.seen, r.f.Applied()) }
func (r *indexRecorder) Revoked([]Assignment)  {}
func (r *indexRecorder) Released([]Ref)        {}

// TestAppliedIndex: Applied is the entry being applied inside an Observer
// call and the newest one after; a snapshot carries it to a restored FSM.
func TestAppliedIndex(t *testing.T) {
	r := &indexRecorder{}
	f := New(r)
	r.f = f
	require.Zero(t, f.Applied())
	for i, id := range []int64{1, 2} {
		b, err := Encode(MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: id, Attempt: 1, Node: "a", Pool: "p"}}})
		require.NoError(t, err)
		f.Apply(&raft.Log{Index: uint64(10 + i), Data: b})
	}
	require.Equal(t, []uint64{10, 11}, r.seen)
	require.Equal(t, uint64(11), f.Applied())

	require.Equal(t, uint64(11), restoredCopy(t, f).Applied())
}

// restoredCopy snapshots f and restores the snapshot into a new FSM.
func restoredCopy(t *testing.T, f *FSM) *FSM {
	t.Helper()
	snap, err := f.Snapshot()
	require.NoError(t, err)
	sink := &memSink{}
	require.NoError(t, snap.Persist(sink))
	g := New(nil)
	require.NoError(t, g.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))))
	return g
}

// orderRecorder records the order of observer calls.
type orderRecorder struct{ calls []string }

func (r *orderRecorder) Assigned(a []Assignment) {
	for _, x := range a {
		r.calls = append(r.calls, "assigned "+fmtRef(x.Ref()))
	}
}
func (r *orderRecorder) Revoked([]Assignment) {}
func (r *orderRecorder) Released(x []Ref) {
	for _, ref := range x {
		r.calls = append(r.calls, "released "+fmtRef(ref))
	}
}

func fmtRef(r Ref) string {
	return strconv.FormatInt(r.TaskID, 10) + "/" + strconv.Itoa(int(r.Attempt))
}

// A ReleaseAssign entry releases first: the same task's next attempt and
// other tasks take the freed slots, and observers hear of the releases
// before the assignments.
func TestReleaseAssignReleasesFirst(t *testing.T) {
	rec := &orderRecorder{}
	f := New(rec)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{
		{TaskID: 1, Attempt: 1, Node: "a", Pool: "p"}, {TaskID: 2, Attempt: 1, Node: "a", Pool: "p"}}})
	rec.calls = nil
	res := apply(t, f, MsgReleaseAssign, ReleaseAssign{
		Releases: []ReleaseItem{{Ref: Ref{1, 1}}, {Ref: Ref{2, 7}}}, // 2/7 is not held: ignored
		Assign: Assign{Term: 1, Items: []Assignment{
			{TaskID: 1, Attempt: 2, Node: "b", Pool: "p"}, // the released task again
			{TaskID: 2, Attempt: 2, Node: "b", Pool: "p"}, // still held as 2/1
			{TaskID: 3, Attempt: 1, Node: "b", Pool: "q"}}},
	})
	require.Equal(t, 1, res.Released)
	require.Equal(t, 3, res.Changed, "one release and two assignments")
	require.Equal(t, []Ref{{2, 2}}, res.Rejected)
	require.Equal(t, []string{"released 1/1", "assigned 1/2", "assigned 3/1"}, rec.calls)
	c := f.Counts()
	require.Equal(t, 3, c.Workers)
	require.Equal(t, map[string]int{"p": 2, "q": 1}, c.Pools)
	require.Equal(t, map[string]int{"a": 1, "b": 2}, c.PerNode)

	// An older term's assignments are refused; its releases still apply.
	apply(t, f, MsgAssign, Assign{Term: 5})
	res = apply(t, f, MsgReleaseAssign, ReleaseAssign{Releases: []ReleaseItem{{Ref: Ref{3, 1}}},
		Assign: Assign{Term: 4, Items: []Assignment{{TaskID: 4, Attempt: 1, Node: "a", Pool: "q"}}}})
	require.Equal(t, 1, res.Released)
	require.Equal(t, []Ref{{4, 1}}, res.Rejected)
	_, held := f.Get(3)
	require.False(t, held)
}

// CountsAfter predicts exactly what applying a Release does to the
// counters, for any mix of items: held or not, the wrong attempt, repeats,
// yielded with and without the pool slot, revoked, external.
func TestCountsAfterMatchesRelease(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 500 {
		f := New(nil)
		var items []Assignment
		for id := int64(1); id <= 12; id++ {
			if rng.IntN(4) == 0 {
				continue
			}
			items = append(items, Assignment{TaskID: id, Attempt: int32(1 + rng.IntN(2)),
				Node: []string{"a", "b", "c"}[rng.IntN(3)], Pool: []string{"p", "q"}[rng.IntN(2)],
				External: rng.IntN(5) == 0})
		}
		apply(t, f, MsgAssign, Assign{Term: 1, Items: items})
		var revoke []Ref
		var yield []ReleaseItem
		for _, a := range items {
			switch rng.IntN(5) {
			case 0:
				revoke = append(revoke, a.Ref())
			case 1:
				yield = append(yield, ReleaseItem{Ref: a.Ref(), Yielded: true, HoldPool: true})
			}
		}
		apply(t, f, MsgRevoke, Revoke{Items: revoke})
		apply(t, f, MsgRelease, Release{Items: yield})

		var rel []ReleaseItem
		for range rng.IntN(16) {
			rel = append(rel, ReleaseItem{Ref: Ref{TaskID: int64(1 + rng.IntN(13)), Attempt: int32(1 + rng.IntN(2))},
				Yielded: rng.IntN(2) == 0, HoldPool: rng.IntN(2) == 0})
		}
		before := f.Counts()
		predicted := f.CountsAfter(rel)
		require.Equal(t, before, f.Counts(), "round %d: CountsAfter changed the FSM", round)
		apply(t, f, MsgRelease, Release{Items: rel})
		require.Equal(t, f.Counts(), predicted, "round %d: releases %+v", round, rel)
	}
}
