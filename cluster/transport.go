package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/raft"
)

// streamLayer is raft's StreamLayer over TCP, optionally with mutual TLS.
// It tracks its connections: raft's NetworkTransport.Close closes only the
// listener, and closeAll ends the rest so that a stopped node leaves no
// goroutine behind.
type streamLayer struct {
	ln        net.Listener // already wrapped by tls.NewListener when TLS is on
	advertise net.Addr
	dial      func(address string, timeout time.Duration) (net.Conn, error)
	tls       *tls.Config // client side; nil without TLS

	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func (s *streamLayer) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	return s.track(c)
}

func (s *streamLayer) Close() error   { return s.ln.Close() }
func (s *streamLayer) Addr() net.Addr { return s.advertise }

func (s *streamLayer) track(c net.Conn) (net.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	if s.conns == nil {
		s.conns = map[*trackedConn]struct{}{}
	}
	tc := &trackedConn{Conn: c, s: s}
	s.conns[tc] = struct{}{}
	return tc, nil
}

// closeAll closes every connection and refuses new ones.
func (s *streamLayer) closeAll() {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		_ = c.Conn.Close()
	}
}

type trackedConn struct {
	net.Conn
	s *streamLayer
}

func (c *trackedConn) Close() error {
	c.s.mu.Lock()
	delete(c.s.conns, c)
	c.s.mu.Unlock()
	return c.Conn.Close()
}

func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	conn, err := s.dial(string(address), timeout)
	if err != nil {
		return nil, err
	}
	if s.tls == nil {
		return s.track(conn)
	}
	cfg := s.tls.Clone()
	if host, _, err := net.SplitHostPort(string(address)); err == nil {
		cfg.ServerName = host
	}
	tc := tls.Client(conn, cfg)
	_ = tc.SetDeadline(time.Now().Add(timeout))
	if err := tc.Handshake(); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", address, err)
	}
	_ = tc.SetDeadline(time.Time{})
	return s.track(tc)
}

func tcpDial(address string, timeout time.Duration) (net.Conn, error) {
	return net.DialTimeout("tcp", address, timeout)
}

// advAddr is a net.Addr that keeps the advertised text as is (a host name
// is not resolved).
type advAddr string

func (a advAddr) Network() string { return "tcp" }
func (a advAddr) String() string  { return string(a) }

// advertiseFor returns the address to advertise for a listener bound at
// bound: explicit (a 0 port is replaced by the bound port), else the bound
// address, with a wildcard host replaced by fallbackHost or a private IP.
// It never returns a 0 port or a wildcard host.
func advertiseFor(bound net.Addr, explicit, fallbackHost string) (string, error) {
	bhost, bport, err := net.SplitHostPort(bound.String())
	if err != nil {
		return "", err
	}
	if explicit != "" {
		host, port, err := net.SplitHostPort(explicit)
		if err != nil {
			return "", err
		}
		if port == "" || port == "0" {
			port = bport
		}
		return net.JoinHostPort(host, port), nil
	}
	if ip := net.ParseIP(bhost); ip == nil || !ip.IsUnspecified() {
		return net.JoinHostPort(bhost, bport), nil
	}
	if fallbackHost != "" {
		return net.JoinHostPort(fallbackHost, bport), nil
	}
	priv, err := sockaddr.GetPrivateIP()
	if err != nil || priv == "" {
		return "", fmt.Errorf("bound to %s on all interfaces and no private IP found: set an advertise address", bound)
	}
	return net.JoinHostPort(priv, bport), nil
}

func hostOf(addr string) string {
	h, _, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	return h
}

func splitPort(addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, err
	}
	return h, port, nil
}

// tlsConfigs loads the node's certificate and CA. The server side requires
// and verifies client certificates when requireClient is true (Raft),
// verifies them if given otherwise (API: the token authenticates).
type tlsConfigs struct {
	raftServer *tls.Config
	apiServer  *tls.Config
	client     *tls.Config
}

func loadTLS(certFile, keyFile, caFile string) (*tlsConfigs, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("cluster: tls: load key pair: %w", err)
	}
	pool, err := loadCA(caFile)
	if err != nil {
		return nil, err
	}
	base := &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
	}
	raftServer := base.Clone()
	raftServer.ClientAuth = tls.RequireAndVerifyClientCert
	apiServer := base.Clone()
	apiServer.ClientAuth = tls.VerifyClientCertIfGiven
	return &tlsConfigs{raftServer: raftServer, apiServer: apiServer, client: base.Clone()}, nil
}

func loadCA(caFile string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("cluster: tls: read ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("cluster: tls: ca file holds no PEM certificate")
	}
	return pool, nil
}

// ClientTLS returns the TLS configuration an API client (asyncnode join,
// leave, status) uses against nodes serving HTTPS: it trusts caFile and, when
// certFile and keyFile are set, presents that certificate.
func ClientTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	pool, err := loadCA(caFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("cluster: tls: load key pair: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}
