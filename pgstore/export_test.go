package pgstore

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ClaimsPool exposes the pool that runs the leader's claims to the tests.
func (s *Store) ClaimsPool() *pgxpool.Pool { return s.claims }

// LookupsPool exposes the pool that runs the lookups by task id.
func (s *Store) LookupsPool() *pgxpool.Pool { return s.lookups }

// InRefOrder exposes inRefOrder to the tests.
func InRefOrder(refs []Ref, got []StartedTask) []StartedTask { return inRefOrder(refs, got) }

// LookupSettings exposes lookupSettings: the claim's sessions run them too,
// with bitmap scans off as well.
const LookupSettings = lookupSettings

// IDRuns exposes idRuns to the tests.
func IDRuns(refs []Ref) [][]Ref { return idRuns(refs) }

// ClaimLock runs the claim's first round trip on c (see ClaimTasks), with
// no pool running and nothing excluded, and returns the ids it locked and
// the claim's second round trip for term, both as ClaimTasks runs them.
func (s *Store) ClaimLock(ctx context.Context, c *pgx.Conn, req ClaimRequest) ([]int64, func(term int64) error, error) {
	ids, groups, err := claimLock(ctx, c, req, []string{}, []int32{}, []int64{})
	if err != nil {
		return nil, nil, s.wrap("claim tasks", err)
	}
	commit := func(term int64) error {
		_, err := claimCommit(ctx, c, term, req.Now, groups)
		if err != nil {
			return s.wrap("claim tasks", err)
		}
		return nil
	}
	return ids, commit, nil
}
