package agent

import (
	"context"
	"sync"
	"time"

	"github.com/asyncnode/asyncnode/cluster"
	"github.com/asyncnode/asyncnode/executor"
	"github.com/asyncnode/asyncnode/fsm"
	"github.com/asyncnode/asyncnode/pgstore"
)

// Assignment push. A follower learns that an entry is committed only with
// the leader's next AppendEntries, up to Raft's commit timeout later, and
// only then would it start the attempts the entry assigns to it. So the
// leader, once an Assign entry is committed and applied on its side, also
// sends each follower its new attempts directly (POST /v1/assigned), and
// the follower starts them at once. Safe: only committed assignments are
// sent, a start is fenced in the server database like any other, and the
// follower's FSM delivers the same attempts later, which are then skipped
// (and the other way round, by the entry's index). A lost or late push
// costs nothing but the wait it was meant to save.

// assignedPath is the follower endpoint of the push.
const assignedPath = "/v1/assigned"

// pushTimeout bounds one push; pushIdle ends a destination's sender after
// that long without work; pushedTTL forgets a pushed attempt the FSM never
// delivered (the entry cannot be lost once committed, so this only bounds
// memory, e.g. across a snapshot install).
const (
	pushTimeout = 2 * time.Second
	pushIdle    = time.Minute
	pushedTTL   = 5 * time.Minute
	pushQueue   = 256
)

// assignedBatch is the attempts one committed Assign entry gives one node.
type assignedBatch = fsm.AssignedBatch

// assignedRequest is the body of POST /v1/assigned. The leader sends it
// packed (assignedContentType); a follower also reads it as JSON, the form
// leaders before 2026-12-07 sent. A follower of such an older binary
// refuses the packed form (400): it then learns its attempts through Raft,
// a little later, as after any lost push.
type assignedRequest struct {
	Batches []assignedBatch `json:"batches"`
}

// assignedContentType is the packed form of an assignedRequest
// (fsm.PackAssignedBatches). It decodes without reflection, at a fraction
// of the JSON's CPU on the followers.
const assignedContentType = "application/x-asyncnode-assigned"

var (
	_ cluster.Body        = assignedRequest{}
	_ cluster.BodyDecoder = (*assignedRequest)(nil)
)

// ContentType implements cluster.Body and cluster.BodyDecoder.
func (assignedRequest) ContentType() string { return assignedContentType }

// AppendBody implements cluster.Body.
func (r assignedRequest) AppendBody(b []byte) []byte {
	return fsm.PackAssignedBatches(b, r.Batches)
}

// DecodeBody implements cluster.BodyDecoder.
func (r *assignedRequest) DecodeBody(p []byte) error {
	bs, err := fsm.UnpackAssignedBatches(p)
	if err != nil {
		return err
	}
	r.Batches = bs
	return nil
}

// pushState is the leader's senders and the follower's record of attempts
// that arrived by push before the FSM delivered them.
type pushState struct {
	ctx     context.Context // ends when the agent stops (cancelled under mu: no new senders after)
	mu      sync.Mutex
	senders map[string]chan assignedBatch // leader: destination node -> queue
	pushed  map[fsm.Ref]time.Time         // follower: submitted from a push
}

// pushAssigned runs on the leader inside FSM Apply (it must not block): it
// queues each other node's new attempts for its sender.
func (a *Agent) pushAssigned(as []fsm.Assignment) {
	if a.node == nil || !a.node.IsLeader() {
		return
	}
	index := a.fsm.Applied()
	byNode := map[string][]fsm.Assignment{}
	for _, x := range as {
		if x.Node != a.cfg.NodeID {
			byNode[x.Node] = append(byNode[x.Node], x)
		}
	}
	for node, items := range byNode {
		a.push.mu.Lock()
		if a.push.ctx.Err() != nil {
			a.push.mu.Unlock()
			return
		}
		q, ok := a.push.senders[node]
		if !ok {
			q = make(chan assignedBatch, pushQueue)
			a.push.senders[node] = q
			a.goRun(func() { a.sendAssigned(node, q) })
		}
		// Under the lock: a sender only ends, idle, with an empty queue.
		select {
		case q <- assignedBatch{Index: index, Items: items}:
		default: // full: the FSM delivers these anyway
		}
		a.push.mu.Unlock()
	}
}

// sendAssigned delivers queued batches to node, all queued batches in one
// request, until the agent stops or node has been idle for pushIdle.
func (a *Agent) sendAssigned(node string, q chan assignedBatch) {
	idle := time.NewTimer(pushIdle)
	defer idle.Stop()
	for {
		var first assignedBatch
		select {
		case <-a.push.ctx.Done():
			return
		case <-idle.C:
			a.push.mu.Lock()
			if len(q) == 0 {
				delete(a.push.senders, node)
				a.push.mu.Unlock()
				return
			}
			a.push.mu.Unlock()
			idle.Reset(pushIdle)
			continue
		case first = <-q:
		}
		req := assignedRequest{Batches: []assignedBatch{first}}
	more:
		for {
			select {
			case b := <-q:
				req.Batches = append(req.Batches, b)
			default:
				break more
			}
		}
		ctx, cancel := context.WithTimeout(a.push.ctx, pushTimeout)
		if err := a.node.Send(ctx, node, assignedPath, req); err != nil {
			a.log.Debug("assignment push failed; the node learns them through Raft", "member", node, "error", err)
		}
		cancel()
		idle.Reset(pushIdle)
	}
}

// handleAssigned serves POST /v1/assigned on every node: it starts the
// pushed attempts meant for this process that its FSM has not delivered.
func (a *Agent) handleAssigned(req assignedRequest) {
	for _, b := range req.Batches {
		a.submitPushed(b)
	}
}

// submitPushed submits the attempts of b meant for this process, unless
// the FSM already applied b's entry (it submitted them then).
func (a *Agent) submitPushed(b assignedBatch) {
	if a.exec == nil {
		return
	}
	a.push.mu.Lock()
	defer a.push.mu.Unlock()
	if a.fsm.Applied() >= b.Index {
		return
	}
	mine := observer{a}.mine(b.Items)
	if len(mine) == 0 {
		return
	}
	now := time.Now()
	for ref, at := range a.push.pushed {
		if now.Sub(at) > pushedTTL {
			delete(a.push.pushed, ref)
		}
	}
	for _, x := range mine {
		a.push.pushed[x.Ref()] = now
	}
	a.exec.Submit(works(mine))
}

// notPushed returns the attempts of as that did not arrive by push, and
// forgets those that did (the FSM has now delivered them).
func (a *Agent) notPushed(as []fsm.Assignment) []fsm.Assignment {
	a.push.mu.Lock()
	defer a.push.mu.Unlock()
	if len(a.push.pushed) == 0 {
		return as
	}
	out := as[:0:0]
	for _, x := range as {
		if _, ok := a.push.pushed[x.Ref()]; ok {
			delete(a.push.pushed, x.Ref())
			continue
		}
		out = append(out, x)
	}
	return out
}

// works converts assignments to executor work.
func works(as []fsm.Assignment) []executor.Work {
	work := make([]executor.Work, len(as))
	for i, x := range as {
		work[i] = executor.Work{Ref: pgstore.Ref{TaskID: x.TaskID, Attempt: x.Attempt}, Deadline: time.UnixMilli(x.Deadline)}
	}
	return work
}
