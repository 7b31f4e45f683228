package cluster

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

const maxBody = 8 << 20

// Health is the answer of GET /v1/health.
type Health struct {
	Status   string `json:"status"` // "ok"
	ID       string `json:"id"`
	Role     Role   `json:"role"`
	State    string `json:"raft_state"`
	LeaderID string `json:"leader_id,omitempty"`
	Term     uint64 `json:"term"`
}

type applyRequest struct {
	Cmd []byte `json:"cmd"`
}

type applyResponse struct {
	Result []byte `json:"result"`
}

type joinRequest struct {
	Addrs      []string `json:"addrs"`
	GossipAddr string   `json:"gossip_addr,omitempty"` // also accepted: one address
}

type joinResponse struct {
	Joined int `json:"joined"`
}

type removeRequest struct {
	ID string `json:"id"`
}

type membersResponse struct {
	Members []Member `json:"members"`
}

type okResponse struct {
	OK bool `json:"ok"`
}

func (n *Node) routes() {
	n.mux.HandleFunc("/v1/health", n.method(http.MethodGet, n.handleHealth))
	n.mux.HandleFunc("/v1/apply", n.method(http.MethodPost, n.handleApply))
	n.mux.HandleFunc("/v1/join", n.method(http.MethodPost, n.handleJoin))
	n.mux.HandleFunc("/v1/leave", n.method(http.MethodPost, n.handleLeave))
	n.mux.HandleFunc("/v1/remove", n.method(http.MethodPost, n.handleRemove))
	n.mux.HandleFunc("/v1/members", n.method(http.MethodGet, n.handleMembers))
}

func (n *Node) listenHTTP() error {
	ln, err := net.Listen("tcp", n.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("cluster: api listen %s: %w", n.cfg.HTTPAddr, err)
	}
	n.httpLn = ln
	adv, err := advertiseFor(ln.Addr(), n.cfg.HTTPAdvertise, hostOf(n.raftAddr))
	if err != nil {
		return fmt.Errorf("cluster: api advertise: %w", err)
	}
	n.apiAddr = adv
	return nil
}

func (n *Node) serveHTTP() {
	n.httpSrv = &http.Server{
		Handler:           n.authorize(n.mux),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          n.log.Named("api").StandardLogger(nil),
	}
	ln := n.httpLn
	if n.tls != nil {
		n.httpSrv.TLSConfig = n.tls.apiServer
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		var err error
		if n.tls != nil {
			err = n.httpSrv.ServeTLS(ln, "", "")
		} else {
			err = n.httpSrv.Serve(ln)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.log.Error("api server failed", "error", err)
		}
	}()
}

// authorize checks the bearer token (except GET /v1/health) and answers
// unknown paths with a JSON 404.
func (n *Node) authorize(next *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		public := r.URL.Path == "/v1/health" && r.Method == http.MethodGet
		if n.cfg.Token != "" && !public {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(n.cfg.Token)) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="asyncnode"`)
				writeError(w, &APIError{Code: CodeUnauthorized, Message: "missing or wrong bearer token"})
				return
			}
		}
		if _, pattern := next.Handler(r); pattern == "" {
			writeError(w, &APIError{Code: CodeNotFound, Message: "no such endpoint: " + r.URL.Path})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (n *Node) method(m string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != m {
			w.Header().Set("Allow", m)
			writeError(w, &APIError{Code: CodeMethodNotAllowed, Message: "use " + m})
			return
		}
		if !n.running() {
			writeError(w, &APIError{Code: CodeUnavailable, Message: "node is shutting down"})
			return
		}
		h(w, r)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, e *APIError) {
	if e.Status == 0 {
		e.Status = statusForCode(e.Code)
	}
	writeJSON(w, e.Status, e)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	return readBody(w, r, "json", func(body io.Reader) error {
		dec := json.NewDecoder(body)
		dec.DisallowUnknownFields()
		return dec.Decode(v)
	})
}

// readBody decodes r's body, read within the size cap, with decode; a body
// that does not decode is answered 400, naming its form.
func readBody(w http.ResponseWriter, r *http.Request, form string, decode func(io.Reader) error) bool {
	if err := decode(http.MaxBytesReader(w, r.Body, maxBody)); err != nil {
		writeError(w, &APIError{Code: CodeBadRequest, Message: "bad " + form + " body: " + err.Error()})
		return false
	}
	return true
}

// errorFor maps an error to its API answer.
func (n *Node) errorFor(err error) *APIError {
	var ae *ApplyError
	switch {
	case errors.As(err, &ae):
		return &APIError{Code: CodeApplyError, Message: ae.Err.Error()}
	case errors.Is(err, ErrNotLeader):
		return n.notLeader()
	case errors.Is(err, ErrNoLeader):
		return &APIError{Code: CodeNoLeader, Message: "no leader known"}
	case errors.Is(err, ErrStopped):
		return &APIError{Code: CodeUnavailable, Message: "node is shutting down"}
	case errors.Is(err, ErrRefused):
		return &APIError{Code: CodeConflict, Message: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &APIError{Code: CodeTimeout, Message: err.Error()}
	}
	return &APIError{Code: CodeInternal, Message: err.Error()}
}

func (n *Node) notLeader() *APIError {
	id, api := n.Leader()
	if id == "" || id == n.cfg.NodeID {
		return &APIError{Code: CodeNoLeader, Message: "no leader known"}
	}
	return &APIError{Code: CodeNotLeader, Message: "this node is not the leader", LeaderID: id, LeaderAPI: api}
}

// Send posts in (as JSON or, for a Body, in its own form) to path on
// member id's API (its address as announced in gossip), with this node's
// token and TLS settings; the answer is discarded. It carries agent-level
// messages between nodes.
func (n *Node) Send(ctx context.Context, id, path string, in any) error {
	mi, ok := n.members.get(id)
	if !ok || mi.Health != HealthAlive || mi.Meta.API == "" {
		return fmt.Errorf("cluster: member %q is not alive in gossip", id)
	}
	return n.client.at(mi.Meta.API).do(ctx, http.MethodPost, path, in, nil)
}

// BodyDecoder is implemented by a *T of HandlePost that also accepts a
// body in a form of its own (see Body): a request whose Content-Type is
// ContentType() is decoded with DecodeBody instead of as JSON.
type BodyDecoder interface {
	ContentType() string
	DecodeBody(p []byte) error
}

// HandlePost registers an extra POST endpoint whose body is a JSON T (or,
// when *T is a BodyDecoder, T in its own form), with the built-in
// endpoints' checks and answers: bearer token, method, size cap, a JSON
// error for a malformed body, 503 while the node shuts down, and
// {"ok":true} once h returned. Like Handle, it must be called before
// Start.
func HandlePost[T any](n *Node, path string, h func(T)) {
	n.Handle(path, n.method(http.MethodPost, func(w http.ResponseWriter, r *http.Request) {
		var v T
		if d, ok := any(&v).(BodyDecoder); ok && r.Header.Get("Content-Type") == d.ContentType() {
			if !readBody(w, r, d.ContentType(), func(body io.Reader) error {
				p, err := io.ReadAll(body)
				if err != nil {
					return err
				}
				return d.DecodeBody(p)
			}) {
				return
			}
		} else if !readJSON(w, r, &v) {
			return
		}
		h(v)
		writeJSON(w, http.StatusOK, okResponse{OK: true})
	}))
}

func (n *Node) handleHealth(w http.ResponseWriter, _ *http.Request) {
	h := Health{Status: "ok", ID: n.cfg.NodeID, Role: RoleNone, State: n.raft.State().String(), Term: n.raft.CurrentTerm()}
	h.LeaderID, _ = n.Leader()
	if h.LeaderID == n.cfg.NodeID && n.IsLeader() {
		h.Role = RoleLeader
	} else if servers, err := n.configuration(); err == nil {
		for _, s := range servers {
			if string(s.ID) == n.cfg.NodeID {
				h.Role = RoleNonvoter
				if s.Suffrage == raft.Voter {
					h.Role = RoleVoter
				}
			}
		}
	}
	writeJSON(w, http.StatusOK, h)
}

// handleApply applies on the leader only; followers answer not_leader with
// the leader's address (Node.Apply forwards server-side).
func (n *Node) handleApply(w http.ResponseWriter, r *http.Request) {
	var req applyRequest
	if !readJSON(w, r, &req) {
		return
	}
	if !n.IsLeader() {
		writeError(w, n.notLeader())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), DefaultApplyTimeout)
	defer cancel()
	res, handled, err := []byte(nil), false, error(nil)
	if n.cfg.Forwarded != nil {
		res, handled, err = n.cfg.Forwarded(ctx, req.Cmd)
	}
	if !handled {
		res, err = n.applyLocal(ctx, req.Cmd)
	}
	if err != nil {
		writeError(w, n.errorFor(err))
		return
	}
	writeJSON(w, http.StatusOK, applyResponse{Result: res})
}

// handleJoin makes the local memberlist join the given gossip addresses.
func (n *Node) handleJoin(w http.ResponseWriter, r *http.Request) {
	var req joinRequest
	if !readJSON(w, r, &req) {
		return
	}
	addrs := append([]string(nil), req.Addrs...)
	if req.GossipAddr != "" {
		addrs = append(addrs, req.GossipAddr)
	}
	if len(addrs) == 0 {
		writeError(w, &APIError{Code: CodeBadRequest, Message: "addrs is empty"})
		return
	}
	joined, err := n.JoinGossip(addrs)
	if err != nil {
		e := n.errorFor(err)
		if e.Code == CodeInternal {
			e.Code, e.Status = CodeUnavailable, 0
		}
		writeError(w, e)
		return
	}
	writeJSON(w, http.StatusOK, joinResponse{Joined: joined})
}

// handleLeave makes the local node leave the cluster gracefully; the
// process notices through Left() and stops.
func (n *Node) handleLeave(w http.ResponseWriter, r *http.Request) {
	// Refuse what cannot succeed before the embedding process drains.
	if err := n.checkCanLeave(); err != nil {
		writeError(w, n.errorFor(err))
		return
	}
	if n.cfg.BeforeLeave != nil {
		// A client that gives up must not abort the drain half-way.
		if err := n.cfg.BeforeLeave(context.WithoutCancel(r.Context())); err != nil {
			n.log.Warn("leave: preparing to leave", "error", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 30*time.Second)
	defer cancel()
	if err := n.Leave(ctx); err != nil {
		writeError(w, n.errorFor(err))
		return
	}
	writeJSON(w, http.StatusOK, okResponse{OK: true})
}

// handleRemove removes a server from Raft (leader only); used by Leave.
func (n *Node) handleRemove(w http.ResponseWriter, r *http.Request) {
	var req removeRequest
	if !readJSON(w, r, &req) {
		return
	}
	if req.ID == "" {
		writeError(w, &APIError{Code: CodeBadRequest, Message: "id is required"})
		return
	}
	if !n.IsLeader() {
		writeError(w, n.notLeader())
		return
	}
	if req.ID == n.cfg.NodeID {
		writeError(w, &APIError{Code: CodeConflict, Message: "the leader does not remove itself: it leaves through Leave"})
		return
	}
	if err := n.removeServer(req.ID); err != nil {
		writeError(w, n.errorFor(err))
		return
	}
	writeJSON(w, http.StatusOK, okResponse{OK: true})
}

func (n *Node) handleMembers(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, membersResponse{Members: n.Members()})
}

// drain reads and discards what is left of a body so connections are reused.
func drain(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, maxBody))
	_ = rc.Close()
}
