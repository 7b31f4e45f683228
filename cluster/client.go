package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Client calls a node's API. It is used for forwarding between nodes and by
// the asyncnode CLI (join, leave, members).
type Client struct {
	base  string
	token string
	https bool
	hc    *http.Client
}

// NewClient returns a client of the node API at addr ("host:port" or a
// URL). token is sent as a bearer token when set. With tlsConf the client
// speaks HTTPS (see ClientTLS).
func NewClient(addr, token string, tlsConf *tls.Config) *Client {
	tr := &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
		TLSClientConfig:     tlsConf,
		ForceAttemptHTTP2:   false,
	}
	c := &Client{token: token, https: tlsConf != nil, hc: &http.Client{Transport: tr}}
	c.base = c.url(addr)
	return c
}

func (c *Client) url(addr string) string {
	if addr == "" || strings.Contains(addr, "://") {
		return strings.TrimSuffix(addr, "/")
	}
	scheme := "http"
	if c.https {
		scheme = "https"
	}
	return scheme + "://" + addr
}

// at returns a client of another node sharing c's connections.
func (c *Client) at(addr string) *Client {
	return &Client{base: c.url(addr), token: c.token, https: c.https, hc: c.hc}
}

// CloseIdleConnections closes kept-alive connections.
func (c *Client) CloseIdleConnections() { c.hc.CloseIdleConnections() }

// Body is a request body that Node.Send encodes in a form of its own
// rather than as JSON; the endpoint's T decodes it (BodyDecoder).
type Body interface {
	// ContentType names the form (the request's Content-Type).
	ContentType() string
	// AppendBody appends the encoded body to b.
	AppendBody(b []byte) []byte
}

// do sends a request (JSON, or in the form of a Body) and decodes a JSON
// answer into out. Error answers come back as *APIError.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	contentType := "application/json"
	if rb, ok := in.(Body); ok {
		body, contentType = bytes.NewReader(rb.AppendBody(nil)), rb.ContentType()
	} else if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", contentType)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cluster: api %s %s: %w", method, path, err)
	}
	defer drain(resp.Body)
	if resp.StatusCode/100 != 2 {
		ae := &APIError{}
		if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(ae); err != nil || ae.Code == "" {
			ae = &APIError{Code: CodeInternal, Message: http.StatusText(resp.StatusCode)}
		}
		ae.Status = resp.StatusCode
		return ae
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(out); err != nil {
		return fmt.Errorf("cluster: api %s %s: bad answer: %w", method, path, err)
	}
	return nil
}

// Health calls GET /v1/health.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	err := c.do(ctx, http.MethodGet, "/v1/health", nil, &h)
	return h, err
}

// Members calls GET /v1/members.
func (c *Client) Members(ctx context.Context) ([]Member, error) {
	var r membersResponse
	err := c.do(ctx, http.MethodGet, "/v1/members", nil, &r)
	return r.Members, err
}

// Join asks the node to join the gossip addresses addrs (POST /v1/join).
func (c *Client) Join(ctx context.Context, addrs []string) (int, error) {
	var r joinResponse
	err := c.do(ctx, http.MethodPost, "/v1/join", joinRequest{Addrs: addrs}, &r)
	return r.Joined, err
}

// Leave asks the node to leave the cluster gracefully (POST /v1/leave).
func (c *Client) Leave(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/leave", struct{}{}, nil)
}

// Apply sends cmd to POST /v1/apply, which only the leader serves: other
// nodes answer an *APIError with code not_leader and the leader's address.
func (c *Client) Apply(ctx context.Context, cmd []byte) ([]byte, error) {
	var r applyResponse
	if err := c.do(ctx, http.MethodPost, "/v1/apply", applyRequest{Cmd: cmd}, &r); err != nil {
		return nil, err
	}
	return r.Result, nil
}

func (c *Client) remove(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/v1/remove", removeRequest{ID: id}, nil)
}
