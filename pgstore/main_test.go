package pgstore_test

import (
	"os"
	"testing"

	"github.com/asyncnode/asyncnode/pgstore/pgtest"
)

// h is the package's throwaway PostgreSQL with a migrated template.
var h *pgtest.Harness

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m, &h)) }
