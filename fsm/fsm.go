// Package fsm is asyncnode's replicated state machine: who holds which
// worker and pool slot. Postgres is the truth for a task's state; this FSM is
// the truth for which attempt of a task holds a slot, on which node.
//
// Apply is deterministic: it reads no clock, does no I/O and never calls
// Postgres. The leader stamps deadlines and incarnations into commands
// before proposing them.
package fsm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
)

// MessageType identifies a log entry's command. Values are append-only and
// never reused.
type MessageType uint8

// Log entry types.
const (
	MsgAssign   MessageType = 1 // leader: slots granted to attempts
	MsgRelease  MessageType = 2 // node or leader: attempts no longer need slots
	MsgRevoke   MessageType = 3 // leader: the owning node must stop these attempts
	MsgRegister MessageType = 4 // a node process announces its incarnation
	MsgForget   MessageType = 5 // leader: a node left the cluster for good
	MsgSetID    MessageType = 6 // first leader: the cluster's identity
	// MsgReleaseAssign is a Release and an Assign in one entry (leader):
	// the releases apply first, so the assignments may reuse their slots.
	MsgReleaseAssign MessageType = 7
	// MsgReleaseAssignPacked is a ReleaseAssign in a compact binary form
	// (see packed.go) instead of JSON: what the leader writes at every
	// dispatch pass since 2026-12-05. Older binaries refuse it
	// (ErrUnknownType), so upgrade the followers before the leader.
	MsgReleaseAssignPacked MessageType = 8
)

// Ref names one attempt of a task.
type Ref struct {
	TaskID  int64 `json:"t"`
	Attempt int32 `json:"a"`
}

// Assignment is one attempt holding slots.
type Assignment struct {
	TaskID      int64  `json:"t"`
	Attempt     int32  `json:"a"`
	Node        string `json:"n,omitempty"`
	Incarnation string `json:"i,omitempty"`
	Pool        string `json:"p"`
	Deadline    int64  `json:"d"`           // unix milliseconds
	External    bool   `json:"x,omitempty"` // non-query task: pool slot only, no node
	Yielded     bool   `json:"y,omitempty"` // yielded, keeps its pool slot (track_yielded)
	Revoked     bool   `json:"r,omitempty"` // owner told to stop; still counted until released
}

// Ref returns the attempt's reference.
func (a Assignment) Ref() Ref { return Ref{TaskID: a.TaskID, Attempt: a.Attempt} }

// HoldsWorker reports whether the attempt counts against control.workers.
func (a Assignment) HoldsWorker() bool { return !a.External && !a.Yielded }

// Assign grants slots; stamped by the leader of Term.
type Assign struct {
	Term  uint64       `json:"term"`
	Items []Assignment `json:"items"`
}

// Release frees the slots of finished attempts. An item with Yielded and
// HoldPool set keeps its pool slot but gives up its worker slot.
type Release struct {
	Items []ReleaseItem `json:"items"`
}

// ReleaseAssign frees slots, then grants slots, in one entry. The leader
// puts the releases its nodes report into the entry that assigns the slots
// they free, which saves a commit between one task and the next. An older
// binary refuses the entry type (ErrUnknownType), so upgrade the followers
// before the leader.
type ReleaseAssign struct {
	Releases []ReleaseItem `json:"releases"`
	Assign
}

// ReleaseItem is one attempt in a Release.
type ReleaseItem struct {
	Ref
	Yielded  bool `json:"y,omitempty"`
	HoldPool bool `json:"h,omitempty"`
}

// Revoke asks owners to stop attempts (cancel, deferral, lost lease).
type Revoke struct {
	Items []Ref `json:"items"`
}

// Register records a node's current process incarnation. Assignments to an
// older incarnation of that node are lost: the leader resolves them.
type Register struct {
	Node        string `json:"node"`
	Incarnation string `json:"inc"`
	// MaxTasks caps the worker slots the node holds at once (0: no cap).
	MaxTasks int `json:"max,omitempty"`
	// Draining nodes take no new tasks (graceful leave).
	Draining bool `json:"drain,omitempty"`
}

// NodeReg is a node's registration.
type NodeReg struct {
	Incarnation string `json:"inc"`
	MaxTasks    int    `json:"max,omitempty"`
	Draining    bool   `json:"drain,omitempty"`
}

// SetID records the cluster's identity once; later values are ignored.
type SetID struct {
	ClusterID string `json:"id"`
}

// Forget removes a node's registration.
type Forget struct {
	Node string `json:"node"`
}

// Result is the response of Apply for every command (JSON-encoded by
// Encode/the cluster layer).
type Result struct {
	// Rejected lists attempts an Assign could not grant (task already held).
	Rejected []Ref `json:"rejected,omitempty"`
	// Changed counts assignments created, released or revoked.
	Changed int `json:"changed"`
	// Released counts the releases of a ReleaseAssign that freed slots
	// (they are in Changed too).
	Released int `json:"released,omitempty"`
}

// Observer is told about committed changes, synchronously inside Apply; its
// methods must not block. It is not called on Restore.
type Observer interface {
	Assigned(items []Assignment)
	Revoked(items []Assignment)
	Released(items []Ref)
}

// ErrUnknownType is returned (as the Apply response) for an entry type this
// binary does not know; that is a version skew, not corruption.
var ErrUnknownType = errors.New("fsm: unknown message type")

// Encode builds a log entry: one type byte and a JSON payload, or for
// MsgReleaseAssignPacked (v must be a ReleaseAssign) the packed payload.
func Encode(t MessageType, v any) ([]byte, error) {
	if t == MsgReleaseAssignPacked {
		c, ok := v.(ReleaseAssign)
		if !ok {
			return nil, fmt.Errorf("fsm: encode type %d: want a ReleaseAssign, got %T", t, v)
		}
		return packReleaseAssign([]byte{byte(t)}, c), nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("fsm: encode type %d: %w", t, err)
	}
	return append([]byte{byte(t)}, b...), nil
}

// DecodeResult parses the bytes returned by Apply.
func DecodeResult(b []byte) (Result, error) {
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("fsm: decode result: %w", err)
	}
	return r, nil
}

// FSM implements raft.FSM.
type FSM struct {
	mu  sync.RWMutex
	st  *state
	obs Observer
	// applied is the index of the newest entry applied (or restored from
	// a snapshot); during an Observer call it is that call's entry.
	applied atomic.Uint64
}

type state struct {
	Assign map[int64]*Assignment `json:"assign"`
	Nodes  map[string]NodeReg    `json:"nodes"`
	Term   uint64                `json:"term"` // newest term that assigned
	ID     string                `json:"id"`   // cluster identity

	counters
}

// counters are the slot counts derived from the assignments.
type counters struct {
	pools   map[string]int
	workers int
	perNode map[string]int
}

func newState() *state {
	return &state{Assign: map[int64]*Assignment{}, Nodes: map[string]NodeReg{},
		counters: counters{pools: map[string]int{}, perNode: map[string]int{}}}
}

func (s *state) add(a *Assignment) {
	s.Assign[a.TaskID] = a
	s.pools[a.Pool]++
	if a.HoldsWorker() {
		s.workers++
		s.perNode[a.Node]++
	}
}

// release frees the slots a release item gives up and reports whether the
// assignment stays (yielded, keeping its pool slot); it then marks a (the
// caller's copy) yielded. A yielded task that tracks its pool slot keeps it
// until it ends; that includes a non-query task handed out by get_tasks on
// an asynchronous target (it never held a worker slot).
func (c *counters) release(a *Assignment, it ReleaseItem) (stays bool) {
	if it.Yielded && it.HoldPool && !a.Revoked {
		c.dropWorker(a)
		a.Yielded = true
		return true
	}
	c.decPool(a.Pool)
	c.dropWorker(a)
	return false
}

func (c *counters) decPool(p string) {
	if c.pools[p]--; c.pools[p] <= 0 {
		delete(c.pools, p)
	}
}

func (c *counters) dropWorker(a *Assignment) {
	if !a.HoldsWorker() {
		return
	}
	c.workers--
	if c.perNode[a.Node]--; c.perNode[a.Node] <= 0 {
		delete(c.perNode, a.Node)
	}
}

// New returns an empty FSM that reports to obs (may be nil).
func New(obs Observer) *FSM {
	return &FSM{st: newState(), obs: obs}
}

type handler func(f *FSM, payload []byte) (Result, []func())

var handlers = map[MessageType]handler{
	MsgAssign:              (*FSM).applyAssign,
	MsgRelease:             (*FSM).applyRelease,
	MsgRevoke:              (*FSM).applyRevoke,
	MsgRegister:            (*FSM).applyRegister,
	MsgForget:              (*FSM).applyForget,
	MsgSetID:               (*FSM).applySetID,
	MsgReleaseAssign:       (*FSM).applyReleaseAssign,
	MsgReleaseAssignPacked: (*FSM).applyReleaseAssignPacked,
}

// Apply implements raft.FSM. It returns []byte (an encoded Result) or an error.
func (f *FSM) Apply(l *raft.Log) any {
	if len(l.Data) == 0 {
		return fmt.Errorf("fsm: empty entry at index %d", l.Index)
	}
	h, ok := handlers[MessageType(l.Data[0])]
	if !ok {
		return fmt.Errorf("%w %d at index %d", ErrUnknownType, l.Data[0], l.Index)
	}
	f.mu.Lock()
	f.applied.Store(l.Index)
	res, notify, err := f.call(h, l.Data[1:])
	f.mu.Unlock()
	if err != nil {
		return fmt.Errorf("fsm: entry at index %d: %w", l.Index, err)
	}
	for _, n := range notify {
		n()
	}
	b, _ := json.Marshal(res)
	return b
}

// ErrMalformed is returned (as Apply's response) for an entry whose payload
// does not decode; it changes nothing.
var ErrMalformed = errors.New("malformed entry")

// decodeError carries a payload decoding failure out of a handler.
type decodeError struct{ err error }

// call runs h, turning a payload that does not decode into ErrMalformed.
// Every handler decodes before it changes anything, and decoding fails the
// same way on every replica, so rejecting such an entry is deterministic:
// a malformed entry (a bug, or a request to an API without a token) must
// not stop every node at every replay of the log.
func (f *FSM) call(h handler, payload []byte) (res Result, notify []func(), err error) {
	defer func() {
		if r := recover(); r != nil {
			de, ok := r.(decodeError)
			if !ok {
				panic(r)
			}
			res, notify, err = Result{}, nil, fmt.Errorf("%w: %v", ErrMalformed, de.err)
		}
	}()
	res, notify = h(f, payload)
	return res, notify, nil
}

func mustDecode(payload []byte, v any) {
	if err := json.Unmarshal(payload, v); err != nil {
		panic(decodeError{err})
	}
}

func (f *FSM) applyAssign(p []byte) (Result, []func()) {
	var c Assign
	mustDecode(p, &c)
	return f.assign(c)
}

func (f *FSM) assign(c Assign) (Result, []func()) {
	var res Result
	if c.Term < f.st.Term {
		for _, a := range c.Items {
			res.Rejected = append(res.Rejected, a.Ref())
		}
		return res, nil
	}
	f.st.Term = c.Term
	added := make([]Assignment, 0, len(c.Items))
	for _, a := range c.Items {
		if _, held := f.st.Assign[a.TaskID]; held {
			res.Rejected = append(res.Rejected, a.Ref())
			continue
		}
		a := a
		a.Revoked, a.Yielded = false, false
		f.st.add(&a)
		added = append(added, a)
		res.Changed++
	}
	return res, f.notify(func(o Observer) { o.Assigned(added) }, len(added))
}

func (f *FSM) applyRelease(p []byte) (Result, []func()) {
	var c Release
	mustDecode(p, &c)
	return f.release(c.Items)
}

func (f *FSM) release(items []ReleaseItem) (Result, []func()) {
	var res Result
	var freed []Ref
	for _, it := range items {
		a, ok := f.st.Assign[it.TaskID]
		if !ok || a.Attempt != it.Attempt {
			continue
		}
		res.Changed++
		if !f.st.release(a, it) {
			delete(f.st.Assign, a.TaskID)
		}
		freed = append(freed, it.Ref)
	}
	return res, f.notify(func(o Observer) { o.Released(freed) }, len(freed))
}

// applyReleaseAssign applies the releases, then the assignments; observers
// hear of them in that order.
func (f *FSM) applyReleaseAssign(p []byte) (Result, []func()) {
	var c ReleaseAssign
	mustDecode(p, &c)
	return f.releaseAssign(c)
}

func (f *FSM) applyReleaseAssignPacked(p []byte) (Result, []func()) {
	c, err := unpackReleaseAssign(p)
	if err != nil {
		panic(decodeError{err})
	}
	return f.releaseAssign(c)
}

func (f *FSM) releaseAssign(c ReleaseAssign) (Result, []func()) {
	rel, relNotify := f.release(c.Releases)
	res, notify := f.assign(c.Assign)
	res.Changed += rel.Changed
	res.Released = rel.Changed
	return res, append(relNotify, notify...)
}

func (f *FSM) applyRevoke(p []byte) (Result, []func()) {
	var c Revoke
	mustDecode(p, &c)
	var res Result
	var revoked []Assignment
	for _, r := range c.Items {
		a, ok := f.st.Assign[r.TaskID]
		if !ok || a.Attempt != r.Attempt || a.Revoked {
			continue
		}
		a.Revoked = true
		revoked = append(revoked, *a)
		res.Changed++
	}
	return res, f.notify(func(o Observer) { o.Revoked(revoked) }, len(revoked))
}

func (f *FSM) applyRegister(p []byte) (Result, []func()) {
	var c Register
	mustDecode(p, &c)
	f.st.Nodes[c.Node] = NodeReg{Incarnation: c.Incarnation, MaxTasks: c.MaxTasks, Draining: c.Draining}
	return Result{Changed: 1}, nil
}

func (f *FSM) applyForget(p []byte) (Result, []func()) {
	var c Forget
	mustDecode(p, &c)
	delete(f.st.Nodes, c.Node)
	return Result{Changed: 1}, nil
}

func (f *FSM) applySetID(p []byte) (Result, []func()) {
	var c SetID
	mustDecode(p, &c)
	if f.st.ID != "" || c.ClusterID == "" {
		return Result{}, nil
	}
	f.st.ID = c.ClusterID
	return Result{Changed: 1}, nil
}

// ClusterID returns the cluster's identity ("" until the first leader set it).
func (f *FSM) ClusterID() string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.ID
}

func (f *FSM) notify(fn func(Observer), n int) []func() {
	if f.obs == nil || n == 0 {
		return nil
	}
	return []func(){func() { fn(f.obs) }}
}

// Counts is a consistent copy of the slot counters.
type Counts struct {
	Workers int            // attempts holding a worker slot
	Pools   map[string]int // slots held per pool
	PerNode map[string]int // worker slots held per node
	Total   int            // all assignments
}

// Counts returns the current counters.
func (f *FSM) Counts() Counts {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return Counts{Workers: f.st.workers, Total: len(f.st.Assign),
		Pools: maps.Clone(f.st.pools), PerNode: maps.Clone(f.st.perNode)}
}

// CountsAfter returns the counters as they will be once items are
// released, read in one consistent view: the leader claims the slots of
// releases it will commit in the same entry as the new assignments.
func (f *FSM) CountsAfter(items []ReleaseItem) Counts {
	f.mu.RLock()
	defer f.mu.RUnlock()
	c := counters{workers: f.st.workers, pools: maps.Clone(f.st.pools), perNode: maps.Clone(f.st.perNode)}
	// gone and yielded track what the earlier items did, as release does
	// to the assignments themselves.
	gone := map[int64]bool{}
	yielded := map[int64]bool{}
	total := len(f.st.Assign)
	for _, it := range items {
		a, ok := f.st.Assign[it.TaskID]
		if !ok || a.Attempt != it.Attempt || gone[it.TaskID] {
			continue
		}
		cp := *a
		cp.Yielded = cp.Yielded || yielded[it.TaskID]
		if c.release(&cp, it) {
			yielded[it.TaskID] = true
		} else {
			gone[it.TaskID] = true
			total--
		}
	}
	return Counts{Workers: c.workers, Pools: c.pools, PerNode: c.perNode, Total: total}
}

// Assignments returns a copy of all assignments, ordered by task id.
func (f *FSM) Assignments() []Assignment {
	f.mu.RLock()
	out := make([]Assignment, 0, len(f.st.Assign))
	for _, a := range f.st.Assign {
		out = append(out, *a)
	}
	f.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].TaskID < out[j].TaskID })
	return out
}

// RevokedTaskIDs returns, in no particular order, the tasks whose attempt
// was told to stop and still holds its slots. Cheaper than filtering
// Assignments: nothing is copied or sorted, and the leader asks at every
// dispatch pass.
func (f *FSM) RevokedTaskIDs() []int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []int64
	for id, a := range f.st.Assign {
		if a.Revoked {
			out = append(out, id)
		}
	}
	return out
}

// Get returns the assignment of a task, if any.
func (f *FSM) Get(taskID int64) (Assignment, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	a, ok := f.st.Assign[taskID]
	if !ok {
		return Assignment{}, false
	}
	return *a, true
}

// Nodes returns the registered nodes.
func (f *FSM) Nodes() map[string]NodeReg {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make(map[string]NodeReg, len(f.st.Nodes))
	for k, v := range f.st.Nodes {
		out[k] = v
	}
	return out
}

// snapshotVersion is written first in every snapshot.
const snapshotVersion = 1

type snapshotFile struct {
	Version int                `json:"version"`
	Index   uint64             `json:"index,omitempty"` // newest entry applied (absent in older snapshots)
	Term    uint64             `json:"term"`
	ID      string             `json:"id"`
	Nodes   map[string]NodeReg `json:"nodes"`
	Assign  []Assignment       `json:"assign"`
}

// Snapshot implements raft.FSM: it copies state under the lock; Persist
// does the I/O.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s := &snapshotFile{Version: snapshotVersion, Index: f.applied.Load(), Term: f.st.Term, ID: f.st.ID, Nodes: map[string]NodeReg{}}
	for k, v := range f.st.Nodes {
		s.Nodes[k] = v
	}
	for _, a := range f.st.Assign {
		s.Assign = append(s.Assign, *a)
	}
	sort.Slice(s.Assign, func(i, j int) bool { return s.Assign[i].TaskID < s.Assign[j].TaskID })
	return s, nil
}

// Persist implements raft.FSMSnapshot.
func (s *snapshotFile) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(s); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("fsm: persist snapshot: %w", err)
	}
	return sink.Close()
}

// Release implements raft.FSMSnapshot.
func (s *snapshotFile) Release() {}

// Restore implements raft.FSM: it builds a fresh state and swaps it in.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var s snapshotFile
	if err := json.NewDecoder(rc).Decode(&s); err != nil {
		return fmt.Errorf("fsm: restore snapshot: %w", err)
	}
	if s.Version != snapshotVersion {
		return fmt.Errorf("fsm: restore snapshot: unsupported version %d (want %d)", s.Version, snapshotVersion)
	}
	st := newState()
	st.Term = s.Term
	st.ID = s.ID
	for k, v := range s.Nodes {
		st.Nodes[k] = v
	}
	for i := range s.Assign {
		a := s.Assign[i]
		st.add(&a)
	}
	f.mu.Lock()
	f.st = st
	f.applied.Store(s.Index)
	f.mu.Unlock()
	return nil
}

// Applied returns the index of the newest log entry applied, or restored
// from a snapshot (0 for a snapshot written before it was recorded). Inside
// an Observer call it is the index of the entry being applied.
func (f *FSM) Applied() uint64 { return f.applied.Load() }
