package fsm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// The packed form of a ReleaseAssign (MsgReleaseAssignPacked): what the
// leader writes for every dispatch pass, so it is read by every replica and
// at every replay of the log. It carries the same fields as the JSON form in
// about a fifth of the bytes and decodes without reflection:
//
//	uvarint term
//	uvarint n; n strings (uvarint length, bytes): the nodes, incarnations
//	        and pools the items name, each once, in order of first use
//	uvarint n; n releases: varint task id (delta from the previous one),
//	        varint attempt, one flag byte (packYielded, packHoldPool)
//	uvarint n; n items: varint task id (delta), varint attempt, uvarint
//	        node, incarnation and pool (string indexes), varint deadline
//	        (delta from the previous item's), one flag byte (packExternal,
//	        packYielded, packRevoked)
//
// Integers use encoding/binary's varints; a delta starts from 0. Decoding is
// strict: a truncated payload, a string index out of range, an unknown flag
// bit or bytes left over make the entry malformed.

// Flag bits of the packed form.
const (
	packYielded  = 1 << 0
	packHoldPool = 1 << 1 // releases
	packExternal = 1 << 1 // items
	packRevoked  = 1 << 2 // items

	releaseFlags = packYielded | packHoldPool
	itemFlags    = packYielded | packExternal | packRevoked
)

// packReleaseAssign appends the packed form of c to b.
func packReleaseAssign(b []byte, c ReleaseAssign) []byte {
	index := map[string]uint64{}
	var table []string
	ref := func(s string) uint64 {
		i, ok := index[s]
		if !ok {
			i = uint64(len(table))
			index[s] = i
			table = append(table, s)
		}
		return i
	}
	type refs struct{ node, inc, pool uint64 }
	names := make([]refs, len(c.Items))
	for i, a := range c.Items {
		names[i] = refs{ref(a.Node), ref(a.Incarnation), ref(a.Pool)}
	}
	b = binary.AppendUvarint(b, c.Term)
	b = binary.AppendUvarint(b, uint64(len(table)))
	for _, s := range table {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	b = binary.AppendUvarint(b, uint64(len(c.Releases)))
	var prevID int64
	for _, r := range c.Releases {
		b = appendRef(b, r.Ref, &prevID)
		b = append(b, flag(r.Yielded, packYielded)|flag(r.HoldPool, packHoldPool))
	}
	b = binary.AppendUvarint(b, uint64(len(c.Items)))
	prevID = 0
	var prevDeadline int64
	for i, a := range c.Items {
		b = appendRef(b, a.Ref(), &prevID)
		b = binary.AppendUvarint(b, names[i].node)
		b = binary.AppendUvarint(b, names[i].inc)
		b = binary.AppendUvarint(b, names[i].pool)
		b = binary.AppendVarint(b, a.Deadline-prevDeadline)
		prevDeadline = a.Deadline
		b = append(b, flag(a.Yielded, packYielded)|flag(a.External, packExternal)|flag(a.Revoked, packRevoked))
	}
	return b
}

// appendRef appends r's task id, as a delta from *prevID (then set to it),
// and its attempt.
func appendRef(b []byte, r Ref, prevID *int64) []byte {
	b = binary.AppendVarint(b, r.TaskID-*prevID)
	*prevID = r.TaskID
	return binary.AppendVarint(b, int64(r.Attempt))
}

func flag(set bool, bit byte) byte {
	if set {
		return bit
	}
	return 0
}

// errTruncated is a packed payload that ends too early.
var errTruncated = errors.New("packed entry ends too early")

// unpacker reads a packed payload; the first error sticks.
type unpacker struct {
	p   []byte
	err error
}

func (u *unpacker) fail(err error) {
	if u.err == nil {
		u.err = err
	}
	u.p = nil
}

// next reads one varint with read (binary.Uvarint or binary.Varint).
func next[T uint64 | int64](u *unpacker, read func([]byte) (T, int)) T {
	v, n := read(u.p)
	if n <= 0 {
		u.fail(errTruncated)
		return 0
	}
	u.p = u.p[n:]
	return v
}

func (u *unpacker) uvarint() uint64 { return next(u, binary.Uvarint) }

func (u *unpacker) varint() int64 { return next(u, binary.Varint) }

// count reads a list length; every element takes at least minBytes bytes,
// so a count the rest of the payload cannot hold is refused before
// anything is allocated for it.
func (u *unpacker) count(minBytes int) int {
	n := u.uvarint()
	if u.err == nil && n > uint64(len(u.p)/minBytes) {
		u.fail(fmt.Errorf("packed entry: %d elements cannot fit in %d bytes", n, len(u.p)))
		return 0
	}
	return int(n)
}

// ref reads what appendRef wrote: a task id delta from *prevID (which it
// advances) and an attempt.
func (u *unpacker) ref(prevID *int64) Ref {
	*prevID += u.varint()
	return Ref{TaskID: *prevID, Attempt: u.attempt()}
}

func (u *unpacker) attempt() int32 {
	v := u.varint()
	if v < math.MinInt32 || v > math.MaxInt32 {
		u.fail(fmt.Errorf("packed entry: attempt %d out of range", v))
		return 0
	}
	return int32(v)
}

func (u *unpacker) flags(allowed byte) byte {
	if len(u.p) == 0 {
		u.fail(errTruncated)
		return 0
	}
	f := u.p[0]
	u.p = u.p[1:]
	if f&^allowed != 0 {
		u.fail(fmt.Errorf("packed entry: unknown flags %#x", f&^allowed))
	}
	return f
}

// bytes reads a byte string (uvarint length, bytes); it aliases u's
// payload.
func (u *unpacker) bytes() []byte {
	n := u.uvarint()
	if u.err == nil && n > uint64(len(u.p)) {
		u.fail(errTruncated)
	}
	if u.err != nil {
		return nil
	}
	b := u.p[:n]
	u.p = u.p[n:]
	return b
}

func (u *unpacker) str(table []string) string {
	i := u.uvarint()
	if u.err == nil && i >= uint64(len(table)) {
		u.fail(fmt.Errorf("packed entry: string %d of %d", i, len(table)))
		return ""
	}
	if u.err != nil {
		return ""
	}
	return table[i]
}

// unpackReleaseAssign decodes a packed ReleaseAssign.
func unpackReleaseAssign(p []byte) (ReleaseAssign, error) {
	u := unpacker{p: p}
	var c ReleaseAssign
	c.Term = u.uvarint()
	table := make([]string, u.count(1))
	for i := range table {
		b := u.bytes()
		if u.err != nil {
			break
		}
		table[i] = string(b)
	}
	if n := u.count(3); n > 0 {
		c.Releases = make([]ReleaseItem, n)
	}
	var id int64
	for i := range c.Releases {
		r := &c.Releases[i]
		r.Ref = u.ref(&id)
		f := u.flags(releaseFlags)
		r.Yielded, r.HoldPool = f&packYielded != 0, f&packHoldPool != 0
	}
	if n := u.count(7); n > 0 {
		c.Items = make([]Assignment, n)
	}
	id = 0
	var deadline int64
	for i := range c.Items {
		a := &c.Items[i]
		ref := u.ref(&id)
		a.TaskID, a.Attempt = ref.TaskID, ref.Attempt
		a.Node, a.Incarnation, a.Pool = u.str(table), u.str(table), u.str(table)
		deadline += u.varint()
		a.Deadline = deadline
		f := u.flags(itemFlags)
		a.Yielded, a.External, a.Revoked = f&packYielded != 0, f&packExternal != 0, f&packRevoked != 0
	}
	if u.err == nil && len(u.p) > 0 {
		u.fail(fmt.Errorf("packed entry: %d bytes left over", len(u.p)))
	}
	if u.err != nil {
		return ReleaseAssign{}, u.err
	}
	return c, nil
}

// AssignedBatch is the attempts that the Raft entry at Index assigned to
// one node. The leader pushes them to that node (agent's POST
// /v1/assigned), packed by PackAssignedBatches; the JSON names are the
// push's JSON form.
type AssignedBatch struct {
	Index uint64       `json:"index"`
	Items []Assignment `json:"items"`
}

// PackAssignedBatches appends to b the packed form of bs: uvarint the
// number of batches, then each as a byte string (uvarint length, bytes)
// holding a packed ReleaseAssign with the batch's index in the term's
// place and no releases.
func PackAssignedBatches(b []byte, bs []AssignedBatch) []byte {
	b = binary.AppendUvarint(b, uint64(len(bs)))
	var p []byte
	for _, x := range bs {
		p = packReleaseAssign(p[:0], ReleaseAssign{Assign: Assign{Term: x.Index, Items: x.Items}})
		b = binary.AppendUvarint(b, uint64(len(p)))
		b = append(b, p...)
	}
	return b
}

// UnpackAssignedBatches decodes PackAssignedBatches' form, as strictly as
// unpackReleaseAssign.
func UnpackAssignedBatches(p []byte) ([]AssignedBatch, error) {
	u := unpacker{p: p}
	// A batch takes at least 5 bytes: its length and four counts.
	bs := make([]AssignedBatch, 0, u.count(5))
	for i := range cap(bs) {
		payload := u.bytes()
		if u.err != nil {
			break
		}
		c, err := unpackReleaseAssign(payload)
		if err == nil && len(c.Releases) > 0 {
			err = fmt.Errorf("%d releases where none belong", len(c.Releases))
		}
		if err != nil {
			return nil, fmt.Errorf("packed assignments, batch %d: %w", i, err)
		}
		bs = append(bs, AssignedBatch{Index: c.Term, Items: c.Items})
	}
	if u.err == nil && len(u.p) > 0 {
		u.fail(fmt.Errorf("packed entry: %d bytes left over", len(u.p)))
	}
	if u.err != nil {
		return nil, u.err
	}
	return bs, nil
}
