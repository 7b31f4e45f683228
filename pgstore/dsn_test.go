package pgstore_test

import (
	"errors"
	"testing"

	"github.com/asyncnode/asyncnode/pgstore"
	"github.com/stretchr/testify/require"
)

func TestMaskDSN(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"host=db user=app dbname=x", "host=db user=app dbname=x"},
		{"host=db password=secret user=app", "host=db password=xxxxx user=app"},
		{"password=secret", "password=xxxxx"},
		{"host=db password = secret user=app", "host=db password = xxxxx user=app"},
		{"host=db password='my secret' user=app", "host=db password=xxxxx user=app"},
		{`host=db password='it\'s secret' user=app`, "host=db password=xxxxx user=app"},
		{`host=db password=back\ slash user=app`, "host=db password=xxxxx user=app"},
		{"host=db password='unterminated secret", "host=db password=xxxxx"},
		{"host=db password= user=app", "host=db password= xxxxx"}, // libpq: the value is the next word
		{"host=db sslpassword=keypw sslmode=verify-full", "host=db sslpassword=xxxxx sslmode=verify-full"},
		{"host=db\tpassword=secret\nuser=app", "host=db\tpassword=xxxxx\nuser=app"},
		{"host='a b' application_name='password=x' user=u", "host='a b' application_name='password=x' user=u"},
		{"postgres://app:secret@db:5432/x?sslmode=disable", "postgres://app:xxxxx@db:5432/x?sslmode=disable"},
		{"postgresql://app:secret@db/x", "postgresql://app:xxxxx@db/x"},
		{"postgres://app@db/x", "postgres://app@db/x"},
		{"postgres://db/x", "postgres://db/x"},
		{"postgres://app:p%40ss@db/x", "postgres://app:xxxxx@db/x"},
		{"postgres://app:p@ss@db/x", "postgres://app:xxxxx@db/x"},
		{"postgres://app:secret@db:5432", "postgres://app:xxxxx@db:5432"},
		{"postgres://app:secret@db?sslmode=disable", "postgres://app:xxxxx@db?sslmode=disable"},
		{"postgres://app:secret@h1:5432,h2:5432/x", "postgres://app:xxxxx@h1:5432,h2:5432/x"},
		{"postgres://db/x?user=app&password=secret&sslmode=disable", "postgres://db/x?user=app&password=xxxxx&sslmode=disable"},
		{"postgres://u:a@db/x?password=b#frag", "postgres://u:xxxxx@db/x?password=xxxxx#frag"},
		{"postgres:///x?host=/tmp&password=s3cr3t", "postgres:///x?host=/tmp&password=xxxxx"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			require.Equal(t, tc.want, pgstore.MaskDSN(tc.in))
		})
	}
}

func FuzzMaskDSN(f *testing.F) {
	for _, s := range []string{"host=db password='a b c' user=x", "postgres://u:pw@h/db?password=q", "password=\\'x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		_ = pgstore.MaskDSN(s) // must not panic
	})
}

func TestSentinelErrorsAreDistinct(t *testing.T) {
	t.Parallel()
	all := []error{pgstore.ErrSchemaMissing, pgstore.ErrSchemaTooNew, pgstore.ErrSchemaOutdated, pgstore.ErrStaleTerm, pgstore.ErrLockHeld}
	for i, a := range all {
		for j, b := range all {
			require.Equal(t, i == j, errors.Is(a, b))
		}
	}
}
