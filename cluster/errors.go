package cluster

import (
	"errors"
	"fmt"
	"net/http"
)

var (
	// ErrNoLeader means no leader is known right now (an election is under
	// way, or this node is cut off). Nothing was applied; callers retry.
	ErrNoLeader = errors.New("cluster: no leader")
	// ErrNotLeader means the operation needs the leader and this node is not
	// (or stopped being) the leader. Nothing was applied; callers retry, on
	// the leader or through Apply, which forwards.
	ErrNotLeader = errors.New("cluster: not the leader")
	// ErrStopped means the node is not running (not started, or stopped).
	ErrStopped = errors.New("cluster: node is not running")
	// ErrRefused means the cluster refused this node: a duplicate node id,
	// a Raft address already used by another member, or a foreign member.
	ErrRefused = errors.New("cluster: membership refused")
)

// Stable error codes carried in API error bodies ({"error":..., "code":...}).
// Clients match on these, never on the message text.
const (
	CodeBadRequest       = "bad_request"
	CodeUnauthorized     = "unauthorized"
	CodeNotFound         = "not_found"
	CodeMethodNotAllowed = "method_not_allowed"
	CodeNotLeader        = "not_leader"
	CodeNoLeader         = "no_leader"
	CodeApplyError       = "apply_error"
	CodeTimeout          = "timeout"
	CodeUnavailable      = "unavailable"
	CodeConflict         = "conflict"
	CodeInternal         = "internal"
)

// ApplyError is returned by Apply when the command was committed but the
// FSM's Apply returned an error for it. Retrying the same command will not
// help. On the leader Err is the FSM's error itself; through forwarding it
// carries the same message.
type ApplyError struct {
	Err error
}

func (e *ApplyError) Error() string {
	return "cluster: apply rejected by the state machine: " + e.Err.Error()
}

// Unwrap returns the FSM's error.
func (e *ApplyError) Unwrap() error { return e.Err }

// APIError is an error answer of a node's API.
type APIError struct {
	Status    int    `json:"-"`
	Message   string `json:"error"`
	Code      string `json:"code"`
	LeaderID  string `json:"leader_id,omitempty"`
	LeaderAPI string `json:"leader_api,omitempty"`
}

func (e *APIError) Error() string {
	return fmt.Sprintf("cluster: api: %s (%s, http %d)", e.Message, e.Code, e.Status)
}

// Is lets errors.Is match ErrNotLeader and ErrNoLeader by code.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrNotLeader:
		return e.Code == CodeNotLeader
	case ErrNoLeader:
		return e.Code == CodeNoLeader
	case ErrRefused:
		return e.Code == CodeConflict
	}
	return false
}

func statusForCode(code string) int {
	switch code {
	case CodeBadRequest:
		return http.StatusBadRequest
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeNotFound:
		return http.StatusNotFound
	case CodeMethodNotAllowed:
		return http.StatusMethodNotAllowed
	case CodeNotLeader:
		return http.StatusMisdirectedRequest
	case CodeNoLeader, CodeUnavailable:
		return http.StatusServiceUnavailable
	case CodeApplyError:
		return http.StatusUnprocessableEntity
	case CodeTimeout:
		return http.StatusGatewayTimeout
	case CodeConflict:
		return http.StatusConflict
	}
	return http.StatusInternalServerError
}
