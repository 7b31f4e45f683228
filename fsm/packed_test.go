package fsm

import (
	"encoding/binary"
	"encoding/json"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/hashicorp/raft"
	"github.com/stretchr/testify/require"
)

// randomReleaseAssign builds an entry with the values the leader writes and
// with the extremes the format must carry all the same.
func randomReleaseAssign(r *rand.Rand) ReleaseAssign {
	ids := []int64{0, 1, -1, math.MaxInt64, math.MinInt64, 1 << 40}
	strs := []string{"", "a", "node-2", "2f6c1d1e-6a38-4f37-9b3f-5d1b8c2e7a11", "SELF", "pööl ✓"}
	id := func() int64 {
		if r.IntN(4) == 0 {
			return ids[r.IntN(len(ids))]
		}
		return 1_000_000 + r.Int64N(50_000)
	}
	attempt := func() int32 {
		if r.IntN(8) == 0 {
			return []int32{0, -1, math.MaxInt32, math.MinInt32}[r.IntN(4)]
		}
		return 1 + r.Int32N(3)
	}
	var c ReleaseAssign
	c.Term = r.Uint64N(1 << uint(r.IntN(64)))
	for range r.IntN(6) {
		c.Releases = append(c.Releases, ReleaseItem{Ref: Ref{TaskID: id(), Attempt: attempt()},
			Yielded: r.IntN(2) == 0, HoldPool: r.IntN(2) == 0})
	}
	for range r.IntN(6) {
		d := int64(1_764_950_000_000 + r.IntN(3))
		if r.IntN(6) == 0 {
			d = ids[r.IntN(len(ids))]
		}
		c.Items = append(c.Items, Assignment{TaskID: id(), Attempt: attempt(),
			Node: strs[r.IntN(len(strs))], Incarnation: strs[r.IntN(len(strs))], Pool: strs[r.IntN(len(strs))],
			Deadline: d, External: r.IntN(2) == 0, Yielded: r.IntN(2) == 0, Revoked: r.IntN(2) == 0})
	}
	return c
}

func TestPackedReleaseAssignRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 2000 {
		c := randomReleaseAssign(r)
		b, err := Encode(MsgReleaseAssignPacked, c)
		require.NoError(t, err)
		require.Equal(t, byte(MsgReleaseAssignPacked), b[0])
		got, err := unpackReleaseAssign(b[1:])
		require.NoError(t, err, "entry %d: %+v", i, c)
		require.Equal(t, c, got, "entry %d", i)
	}
}

func TestPackedEncodeWantsReleaseAssign(t *testing.T) {
	_, err := Encode(MsgReleaseAssignPacked, Assign{Term: 1})
	require.ErrorContains(t, err, "want a ReleaseAssign, got fsm.Assign")
}

// The packed entry changes the state exactly as the JSON entry with the same
// content does, and tells the observers the same things in the same order.
func TestPackedAppliesLikeJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	plainRec, packedRec := &orderRecorder{}, &orderRecorder{}
	plain, packed := New(plainRec), New(packedRec)
	held := []Ref{}
	for i := range 300 {
		var c ReleaseAssign
		c.Term = uint64(1 + i/100)
		// release some of what is held (and one that is not), assign new ones
		for _, ref := range held {
			if r.IntN(3) == 0 {
				c.Releases = append(c.Releases, ReleaseItem{Ref: ref, Yielded: r.IntN(4) == 0, HoldPool: r.IntN(2) == 0})
			}
		}
		c.Releases = append(c.Releases, ReleaseItem{Ref: Ref{TaskID: 999_999, Attempt: 1}})
		for range r.IntN(5) {
			a := Assignment{TaskID: int64(r.IntN(400)), Attempt: int32(1 + r.IntN(2)), Node: []string{"a", "b", "c"}[r.IntN(3)],
				Incarnation: "inc-1", Pool: []string{"p", "q"}[r.IntN(2)], Deadline: int64(1000 + i), External: r.IntN(5) == 0}
			c.Items = append(c.Items, a)
			held = append(held, a.Ref())
		}
		want := apply(t, plain, MsgReleaseAssign, c)
		got := apply(t, packed, MsgReleaseAssignPacked, c)
		require.Equal(t, want, got, "entry %d", i)
	}
	require.Equal(t, plain.Counts(), packed.Counts())
	require.Equal(t, plainRec.calls, packedRec.calls)
	require.NotEmpty(t, plainRec.calls)
	require.Equal(t, snapshotBytes(t, plain), snapshotBytes(t, packed))
}

func snapshotBytes(t *testing.T, f *FSM) string {
	t.Helper()
	snap, err := f.Snapshot()
	require.NoError(t, err)
	sink := &memSink{}
	require.NoError(t, snap.Persist(sink))
	return sink.String()
}

// Every damaged form of a packed entry is refused as malformed and changes
// nothing.
func TestPackedMalformedIsRejected(t *testing.T) {
	c := ReleaseAssign{
		Releases: []ReleaseItem{{Ref: Ref{TaskID: 5, Attempt: 1}}},
		Assign: Assign{Term: 2, Items: []Assignment{
			{TaskID: 7, Attempt: 1, Node: "a", Incarnation: "i", Pool: "p", Deadline: 10},
			{TaskID: 8, Attempt: 2, Pool: "ext", External: true, Deadline: 10}}},
	}
	good, err := Encode(MsgReleaseAssignPacked, c)
	require.NoError(t, err)
	payload := good[1:]
	var bad [][]byte
	for n := range len(payload) { // every truncation
		bad = append(bad, payload[:n])
	}
	bad = append(bad, append(append([]byte{}, payload...), 0)) // a byte left over
	// the last byte is the second item's flags: set an unknown bit
	unknownFlag := append([]byte{}, payload...)
	unknownFlag[len(unknownFlag)-1] |= 0x80
	bad = append(bad, unknownFlag)
	// a string index past the table (one string, index 5)
	bad = append(bad, []byte{1, 1, 1, 'a', 0, 1, 14, 2, 0, 0, 5, 20, 0})
	// the same with index 0 is a good entry: the test above is not vacuous
	_, err = unpackReleaseAssign([]byte{1, 1, 1, 'a', 0, 1, 14, 2, 0, 0, 0, 20, 0})
	require.NoError(t, err)
	// a count far larger than the payload could hold
	bad = append(bad, []byte{2, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f})

	f := New(nil)
	apply(t, f, MsgAssign, Assign{Term: 1, Items: []Assignment{{TaskID: 5, Attempt: 1, Node: "a", Pool: "p"}}})
	before := f.Counts()
	for i, p := range bad {
		out := f.Apply(&raft.Log{Index: uint64(10 + i), Data: append([]byte{byte(MsgReleaseAssignPacked)}, p...)})
		err, ok := out.(error)
		require.True(t, ok, "damaged payload %d (%x) was applied: %v", i, p, out)
		require.ErrorIs(t, err, ErrMalformed, "payload %d", i)
	}
	require.Equal(t, before, f.Counts())
	res := apply(t, f, MsgReleaseAssignPacked, c)
	require.Equal(t, Result{Changed: 3, Released: 1}, res)
}

// The packed form is what keeps the log small: it must stay well under the
// JSON form of the same entry.
func TestPackedIsSmallerThanJSON(t *testing.T) {
	c := leaderEntry(200)
	j, err := json.Marshal(c)
	require.NoError(t, err)
	p := packReleaseAssign(nil, c)
	require.Less(t, len(p)*3, len(j), "packed %d bytes, JSON %d", len(p), len(j))
}

// leaderEntry is a dispatch pass as the leader writes it: n releases of the
// previous tasks and n new assignments to three nodes in one pool.
func leaderEntry(n int) ReleaseAssign {
	var c ReleaseAssign
	c.Term = 3
	incs := []string{"6f9a0d4e2b7c41d8a3e5f1c2b4d6e8f0", "0c1d2e3f405162738495a6b7c8d9eafb", "9e8d7c6b5a4938271605f4e3d2c1b0a9"}
	for i := range n {
		c.Releases = append(c.Releases, ReleaseItem{Ref: Ref{TaskID: int64(1_000_000 + i), Attempt: 1}})
		node := i % 3
		c.Items = append(c.Items, Assignment{TaskID: int64(1_000_000 + n + i), Attempt: 1,
			Node: []string{"node1", "node2", "node3"}[node], Incarnation: incs[node], Pool: "SELF",
			Deadline: 1_764_950_000_000})
	}
	return c
}

// BenchmarkDecodeReleaseAssign prints the cost of decoding one dispatch
// pass of 200 tasks on a replica, JSON against packed, and the bytes per
// task in the log.
func BenchmarkDecodeReleaseAssign(b *testing.B) {
	c := leaderEntry(200)
	j, err := json.Marshal(c)
	require.NoError(b, err)
	p := packReleaseAssign(nil, c)
	b.Run("json", func(b *testing.B) {
		for b.Loop() {
			var x ReleaseAssign
			if err := json.Unmarshal(j, &x); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(j))/200, "bytes/task")
	})
	b.Run("packed", func(b *testing.B) {
		for b.Loop() {
			if _, err := unpackReleaseAssign(p); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(len(p))/200, "bytes/task")
	})
}

func TestPackedAssignedBatchesRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		var bs []AssignedBatch
		for range r.IntN(4) {
			c := randomReleaseAssign(r)
			bs = append(bs, AssignedBatch{Index: c.Term, Items: c.Items})
		}
		p := PackAssignedBatches([]byte{0xAB}, bs)
		require.Equal(t, byte(0xAB), p[0], "appended to b")
		got, err := UnpackAssignedBatches(p[1:])
		require.NoError(t, err)
		require.Len(t, got, len(bs))
		for i := range bs {
			require.Equal(t, bs[i].Index, got[i].Index)
			if len(bs[i].Items) == 0 {
				require.Empty(t, got[i].Items)
				continue
			}
			require.Equal(t, bs[i].Items, got[i].Items)
		}
	}
}

func TestPackedAssignedBatchesMalformedIsRejected(t *testing.T) {
	items := []Assignment{{TaskID: 7, Attempt: 1, Node: "n2", Incarnation: "i", Pool: "SELF", Deadline: 5}}
	p := PackAssignedBatches(nil, []AssignedBatch{{Index: 9, Items: items}, {Index: 10, Items: items}})
	for n := range len(p) {
		_, err := UnpackAssignedBatches(p[:n])
		require.Error(t, err, "truncated to %d bytes", n)
	}
	_, err := UnpackAssignedBatches(append(p, 0))
	require.ErrorContains(t, err, "1 bytes left over")
	_, err = UnpackAssignedBatches([]byte{0xff, 0xff, 0xff, 0xff, 0x0f})
	require.ErrorContains(t, err, "elements cannot fit")
	withRelease := packReleaseAssign(nil, ReleaseAssign{Releases: []ReleaseItem{{Ref: Ref{TaskID: 1, Attempt: 1}}}, Assign: Assign{Term: 9, Items: items}})
	framed := append(binary.AppendUvarint([]byte{1}, uint64(len(withRelease))), withRelease...)
	_, err = UnpackAssignedBatches(framed)
	require.ErrorContains(t, err, "packed assignments, batch 0: 1 releases where none belong")
	bad := append([]byte(nil), p...)
	bad[len(bad)-1] = 0x80 // the second batch's last flag byte: an unknown flag
	_, err = UnpackAssignedBatches(bad)
	require.ErrorContains(t, err, "packed assignments, batch 1: packed entry: unknown flags")
}
