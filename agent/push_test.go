package agent

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/asyncnode/asyncnode/fsm"
)

func TestAssignedRequestPackedRoundTrip(t *testing.T) {
	req := assignedRequest{Batches: []assignedBatch{
		{Index: 12, Items: []fsm.Assignment{
			{TaskID: 1001, Attempt: 1, Node: "n2", Incarnation: "3f2a9c01d4e5b6a7", Pool: "SELF", Deadline: 1_765_000_000_123},
			{TaskID: 1003, Attempt: 2, Node: "n2", Incarnation: "3f2a9c01d4e5b6a7", Pool: "reports", Deadline: 1_765_000_000_100, Revoked: true},
		}},
		{Index: 13, Items: []fsm.Assignment{{TaskID: 998, Attempt: 1, Node: "n3", Incarnation: "x", Pool: "SELF", Deadline: 5, Yielded: true}}},
	}}
	p := req.AppendBody([]byte("keep"))
	require.Equal(t, "keep", string(p[:4]), "appended to b")
	var got assignedRequest
	require.NoError(t, got.DecodeBody(p[4:]))
	require.Equal(t, req, got)

	// No batches at all decodes to none.
	got = assignedRequest{}
	require.NoError(t, got.DecodeBody(assignedRequest{}.AppendBody(nil)))
	require.Empty(t, got.Batches)
}

// A leader of an older binary sends the JSON form: it still decodes.
func TestAssignedRequestJSONStillReads(t *testing.T) {
	body := `{"batches":[{"index":7,"items":[{"t":42,"a":1,"n":"n2","i":"abc","p":"SELF","d":1765000000000}]}]}`
	var got assignedRequest
	require.NoError(t, json.Unmarshal([]byte(body), &got))
	require.Equal(t, assignedRequest{Batches: []assignedBatch{{Index: 7, Items: []fsm.Assignment{
		{TaskID: 42, Attempt: 1, Node: "n2", Incarnation: "abc", Pool: "SELF", Deadline: 1765000000000}}}}}, got)
}

func TestAssignedRequestMalformedIsRejected(t *testing.T) {
	p := assignedRequest{Batches: []assignedBatch{{Index: 3, Items: []fsm.Assignment{{TaskID: 1, Attempt: 1, Node: "n2", Pool: "SELF"}}}}}.AppendBody(nil)
	for n := range len(p) {
		var r assignedRequest
		require.Error(t, r.DecodeBody(p[:n]), "truncated to %d bytes", n)
		require.Empty(t, r.Batches, "nothing kept from a bad body")
	}
	var r assignedRequest
	require.ErrorContains(t, r.DecodeBody(append(p, 9)), "1 bytes left over")
	require.ErrorContains(t, r.DecodeBody([]byte{0xff, 0xff, 0xff, 0xff, 0x0f}), "elements cannot fit")
	require.ErrorContains(t, r.DecodeBody([]byte(`{"batches":[]}`)), "elements cannot fit", "JSON is not the packed form")
}
