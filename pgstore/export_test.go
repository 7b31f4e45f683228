package pgstore

import "github.com/jackc/pgx/v5/pgxpool"

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
