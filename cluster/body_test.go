package cluster_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/cluster"
)

// counts is a POST body with a packed form of its own: uvarints.
type counts struct {
	N []uint64 `json:"n"`
}

const countsType = "application/x-test-counts"

func (counts) ContentType() string { return countsType }

func (c counts) AppendBody(b []byte) []byte {
	for _, n := range c.N {
		b = binary.AppendUvarint(b, n)
	}
	return b
}

func (c *counts) DecodeBody(p []byte) error {
	c.N = nil
	for len(p) > 0 {
		n, k := binary.Uvarint(p)
		if k <= 0 {
			return errors.New("truncated uvarint")
		}
		c.N, p = append(c.N, n), p[k:]
	}
	return nil
}

// bytesBody sends raw bytes under countsType.
type bytesBody []byte

func (bytesBody) ContentType() string            { return countsType }
func (b bytesBody) AppendBody(dst []byte) []byte { return append(dst, b...) }

// A HandlePost endpoint whose *T is a BodyDecoder reads T in its own form
// (what Send sends for a Body) and still reads JSON; a body it cannot
// decode is a 400 naming the form.
func TestHandlePostOwnBodyForm(t *testing.T) {
	var mu sync.Mutex
	var got []counts
	start := func(cfg cluster.Config) *cluster.Node {
		n, err := cluster.New(cfg, &listFSM{})
		require.NoError(t, err)
		cluster.HandlePost(n, "/v1/test-counts", func(c counts) {
			mu.Lock()
			got = append(got, c)
			mu.Unlock()
		})
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		require.NoError(t, n.Start(ctx))
		t.Cleanup(func() { _ = n.Stop(context.Background()) })
		return n
	}
	n1 := start(baseConfig(t, "n1"))
	cfg2 := baseConfig(t, "n2")
	cfg2.Join = []string{n1.GossipAddr()}
	cfg2.NonVoter = true
	n2 := start(cfg2)
	ctx := ctxT(t, 30*time.Second)
	require.Eventually(t, func() bool {
		return n1.Send(ctx, "n2", "/v1/test-counts", counts{N: []uint64{1, 300, 1 << 40}}) == nil
	}, 15*time.Second, 50*time.Millisecond, "n2 reachable from n1")
	require.NoError(t, n2.Send(ctx, "n1", "/v1/test-counts", struct {
		N []uint64 `json:"n"`
	}{N: []uint64{7}}), "JSON")
	err := n1.Send(ctx, "n2", "/v1/test-counts", bytesBody{0xff})
	var ae *cluster.APIError
	require.ErrorAs(t, err, &ae)
	require.Equal(t, cluster.CodeBadRequest, ae.Code)
	require.Equal(t, "bad "+countsType+" body: truncated uvarint", ae.Message)

	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []counts{{N: []uint64{1, 300, 1 << 40}}, {N: []uint64{7}}}, got[len(got)-2:],
		fmt.Sprintf("received: %v", got))
	for _, c := range got[:len(got)-2] {
		require.Equal(t, []uint64{1, 300, 1 << 40}, c.N, "only the retried first body before")
	}
}
