package cluster

import (
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// reconcileLoop runs on every node and acts while it leads: on every
// membership or leadership event and every second it brings the Raft
// configuration in line with gossip. It also remembers gossip peers in the
// data directory.
func (n *Node) reconcileLoop() {
	defer n.wg.Done()
	t := time.NewTicker(reconcileEvery)
	defer t.Stop()
	var (
		leading bool
		missing map[raft.ServerID]time.Time
		saved   string
	)
	for {
		select {
		case <-n.stopCh:
			return
		default:
		}
		select {
		case <-n.stopCh:
			return
		case <-n.reconcileCh:
		case <-t.C:
			n.members.prune(n.cfg.ReapDeadAfter + time.Minute)
		}
		// At every membership event, not only every second: a node killed
		// within a second of joining must still remember its peers.
		n.savePeers(&saved)
		if n.metaDirty.Swap(false) {
			// The local state changes at once; the wait only confirms the
			// broadcast (push/pull syncs it anyway), so do not retry.
			if err := n.list.UpdateNode(500 * time.Millisecond); err != nil {
				n.log.Debug("metadata broadcast not confirmed", "error", err)
			}
		}
		if !n.IsLeader() {
			leading = false
			continue
		}
		if !leading {
			// Make sure the configuration read below includes everything
			// committed by earlier leaders.
			if err := n.await(n.raft.Barrier(changeTimeout)); err != nil {
				n.log.Warn("reconcile: barrier failed", "error", err)
				continue
			}
			leading = true
			missing = map[raft.ServerID]time.Time{}
		}
		n.reconcile(missing)
	}
}

// candidate is a gossip member as the reconciler sees it.
type candidate struct {
	memberInfo
	healthy bool // alive, not suspect, Raft heartbeats not failing
}

// reconcile applies the placement rules (leader only):
//
//  1. remove servers whose member left (or announced leaving) at once, and
//     those dead or unknown to gossip for ReapDeadAfter;
//  2. add alive members missing from Raft, de-duplicated by id and by Raft
//     address: voters while fewer than Voters, non-voters after that; fix
//     the address of a member that came back on a new one;
//  3. promote healthy non-voters while voters are fewer than Voters;
//  4. demote surplus voters (never the leader) when there are more.
//
// Errors are logged; the next round retries.
func (n *Node) reconcile(missing map[raft.ServerID]time.Time) {
	servers, err := n.configuration()
	if err != nil {
		n.log.Warn("reconcile: read configuration", "error", err)
		return
	}
	now := time.Now()
	self := raft.ServerID(n.cfg.NodeID)
	table := n.members.snapshot()
	suspect := n.suspects(table, now)
	n.hbMu.Lock()
	failing := map[string]bool{}
	for id := range n.failedHB {
		failing[string(id)] = true
	}
	n.hbMu.Unlock()
	tombs := n.liveTombs(table, now)

	cands := map[string]candidate{}
	for id, mi := range table {
		cands[id] = candidate{memberInfo: mi,
			healthy: mi.Health == HealthAlive && !suspect[id] && !failing[id] && !mi.Meta.Leaving}
	}

	// 1. Removals.
	changed := false
	for _, s := range servers {
		if s.ID == self {
			continue
		}
		c, ok := cands[string(s.ID)]
		reason := ""
		switch {
		case !ok:
			first, seen := missing[s.ID]
			if !seen {
				missing[s.ID] = now
			} else if now.Sub(first) >= n.cfg.ReapDeadAfter {
				reason = "unknown to gossip"
			}
		case c.Health == HealthLeft:
			reason = "left"
		case c.Meta.Leaving && c.Health == HealthAlive:
			reason = "leaving"
		case c.Health == HealthDead && now.Sub(c.Since) >= n.cfg.ReapDeadAfter:
			reason = "dead for " + now.Sub(c.Since).Round(time.Second).String()
		}
		if ok {
			delete(missing, s.ID)
		}
		if reason == "" {
			continue
		}
		n.log.Info("removing server", "member", s.ID, "reason", reason, "suffrage", s.Suffrage.String())
		if err := n.await(n.raft.RemoveServer(s.ID, 0, changeTimeout)); err != nil {
			n.log.Warn("remove server failed", "member", s.ID, "error", err)
			return
		}
		delete(missing, s.ID)
		changed = true
	}
	if changed {
		if servers, err = n.configuration(); err != nil {
			return
		}
	}

	byID := map[string]raft.Server{}
	byAddr := map[string]string{}
	voters := 0
	for _, s := range servers {
		byID[string(s.ID)] = s
		byAddr[string(s.Address)] = string(s.ID)
		if s.Suffrage == raft.Voter {
			voters++
		}
	}

	// The leader itself may have come back on a new address.
	if s, ok := byID[string(self)]; ok && string(s.Address) != n.raftAddr {
		n.log.Info("updating own server address", "from", s.Address, "to", n.raftAddr)
		var f raft.IndexFuture
		if s.Suffrage == raft.Voter {
			f = n.raft.AddVoter(self, raft.ServerAddress(n.raftAddr), 0, changeTimeout)
		} else {
			f = n.raft.AddNonvoter(self, raft.ServerAddress(n.raftAddr), 0, changeTimeout)
		}
		if err := n.await(f); err != nil {
			n.log.Warn("update own address failed", "error", err)
			return
		}
	}

	// 2. Additions and address changes, in id order.
	ids := make([]string, 0, len(cands))
	for id := range cands {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		c := cands[id]
		if id == string(self) || c.Health != HealthAlive || c.Meta.Leaving || c.Meta.Raft == "" {
			continue
		}
		if mine := n.ClusterID(); c.Meta.Cluster != "" && c.Meta.Cluster != mine {
			continue // refused by gossip already; never reaches Raft
		}
		if t, ok := tombs[id]; ok && !c.Since.After(t) {
			continue // removed on request and still the same incarnation
		}
		if other, ok := byAddr[c.Meta.Raft]; ok && other != id {
			n.log.Warn("raft address conflict: not adding member", "member", id, "raft", c.Meta.Raft, "used_by", other)
			continue
		}
		s, in := byID[id]
		addr := raft.ServerAddress(c.Meta.Raft)
		switch {
		case in && s.Address == addr:
			continue
		case in:
			n.log.Info("updating server address", "member", id, "from", s.Address, "to", addr)
			var f raft.IndexFuture
			if s.Suffrage == raft.Voter {
				f = n.raft.AddVoter(s.ID, addr, 0, changeTimeout)
			} else {
				f = n.raft.AddNonvoter(s.ID, addr, 0, changeTimeout)
			}
			if err := n.await(f); err != nil {
				n.log.Warn("update server address failed", "member", id, "error", err)
				return
			}
		case c.Meta.Voter && voters < n.cfg.Voters:
			n.log.Info("adding voter", "member", id, "raft", addr)
			if err := n.await(n.raft.AddVoter(raft.ServerID(id), addr, 0, changeTimeout)); err != nil {
				n.log.Warn("add voter failed", "member", id, "error", err)
				return
			}
			voters++
			byID[id] = raft.Server{ID: raft.ServerID(id), Address: addr, Suffrage: raft.Voter}
		default:
			n.log.Info("adding non-voter", "member", id, "raft", addr)
			if err := n.await(n.raft.AddNonvoter(raft.ServerID(id), addr, 0, changeTimeout)); err != nil {
				n.log.Warn("add non-voter failed", "member", id, "error", err)
				return
			}
			byID[id] = raft.Server{ID: raft.ServerID(id), Address: addr, Suffrage: raft.Nonvoter}
		}
		byAddr[string(addr)] = id
	}

	// 3. Promotions.
	for voters < n.cfg.Voters {
		var pick *raft.Server
		for _, id := range ids {
			s, in := byID[id]
			if c := cands[id]; in && s.Suffrage != raft.Voter && c.healthy && c.Meta.Voter {
				pick = &s
				break
			}
		}
		if pick == nil {
			break
		}
		n.log.Info("promoting non-voter", "member", pick.ID, "voters", voters, "want", n.cfg.Voters)
		if err := n.await(n.raft.AddVoter(pick.ID, pick.Address, 0, changeTimeout)); err != nil {
			n.log.Warn("promote failed", "member", pick.ID, "error", err)
			return
		}
		pick.Suffrage = raft.Voter
		byID[string(pick.ID)] = *pick
		voters++
	}

	// 4. Demotions, unhealthy voters first.
	for voters > n.cfg.Voters {
		var pick *raft.Server
		for _, wantHealthy := range []bool{false, true} {
			for id, s := range byID {
				if s.ID == self || s.Suffrage != raft.Voter || cands[id].healthy != wantHealthy {
					continue
				}
				if pick == nil || strings.Compare(string(s.ID), string(pick.ID)) > 0 {
					s := s
					pick = &s
				}
			}
			if pick != nil {
				break
			}
		}
		if pick == nil {
			break
		}
		n.log.Info("demoting surplus voter", "member", pick.ID, "voters", voters, "want", n.cfg.Voters)
		if err := n.await(n.raft.DemoteVoter(pick.ID, 0, changeTimeout)); err != nil {
			n.log.Warn("demote failed", "member", pick.ID, "error", err)
			return
		}
		pick.Suffrage = raft.Nonvoter
		byID[string(pick.ID)] = *pick
		voters--
	}
}

// healthy reports whether member id is alive in gossip, not suspect, not
// leaving and (on the leader) answering Raft heartbeats.
func (n *Node) healthy(id string) bool {
	table := n.members.snapshot()
	mi, ok := table[id]
	if !ok || mi.Health != HealthAlive || mi.Meta.Leaving || n.suspects(table, time.Now())[id] {
		return false
	}
	n.hbMu.Lock()
	_, failing := n.failedHB[raft.ServerID(id)]
	n.hbMu.Unlock()
	return !failing
}

// liveTombs drops tombstones of members that since went away (or are too
// old) and returns the rest.
func (n *Node) liveTombs(table map[string]memberInfo, now time.Time) map[string]time.Time {
	n.tombMu.Lock()
	defer n.tombMu.Unlock()
	out := map[string]time.Time{}
	for id, t := range n.tombs {
		mi, ok := table[id]
		if now.Sub(t) > time.Hour || (ok && mi.Health != HealthAlive) {
			delete(n.tombs, id)
			continue
		}
		out[id] = t
	}
	return out
}

// savePeers writes the gossip addresses of the other live members to the
// data directory when they changed. It reads the node's own member table:
// the *memberlist.Node values that Memberlist.Members returns are
// memberlist's own, which it updates in place without our lock (a data
// race the race detector caught once peers were saved at every event).
func (n *Node) savePeers(saved *string) {
	var addrs []string
	for id, m := range n.members.snapshot() {
		if id != n.cfg.NodeID && m.Health == HealthAlive && m.Gossip != "" {
			addrs = append(addrs, m.Gossip)
		}
	}
	if len(addrs) == 0 {
		return
	}
	sort.Strings(addrs)
	key := strings.Join(addrs, ",")
	if key == *saved {
		return
	}
	if err := writePeers(n.cfg.DataDir, addrs); err != nil {
		n.log.Warn("could not remember gossip peers", "error", err)
		return
	}
	*saved = key
}

// await waits for a Raft future, or until the node stops: Stop shuts Raft
// down and then waits for this loop, and a configuration change that Raft
// accepted just before shutting down may never be answered.
func (n *Node) await(f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-n.stopCh:
		return ErrStopped
	}
}
