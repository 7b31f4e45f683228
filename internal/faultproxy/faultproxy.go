// Package faultproxy is a TCP proxy for fault-injection tests: it forwards
// connections to an upstream address until it is switched into black-hole
// mode, where it accepts connections and holds them open without ever
// answering, and stops forwarding on the connections it already carries.
// With no upstream at all it is a pure black hole: a server that accepts
// TCP and never says a word.
package faultproxy

import (
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Proxy listens on a local address and forwards to an upstream address,
// or black-holes.
type Proxy struct {
	ln       net.Listener
	upstream string

	mu     sync.Mutex
	hole   bool
	closed bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// Listen starts a proxy on addr (e.g. "127.0.0.1:0") forwarding to
// upstream. An empty upstream makes a black hole from the start, for good.
func Listen(addr, upstream string) (*Proxy, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen %s: %w", addr, err)
	}
	p := &Proxy{ln: ln, upstream: upstream, hole: upstream == "", conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address the proxy listens on.
func (p *Proxy) Addr() *net.TCPAddr { return p.ln.Addr().(*net.TCPAddr) }

// Blackhole switches the proxy into black-hole mode: nothing more passes in
// either direction on existing connections, and new ones are accepted and
// held without an answer.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hole = true
}

// Heal ends black-hole mode: every connection held so far is closed (its
// peer sees a reset, as after a network outage) and new connections are
// forwarded again. It does nothing for a proxy without upstream.
func (p *Proxy) Heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.upstream == "" {
		return
	}
	p.hole = false
	for c := range p.conns {
		_ = c.Close()
		delete(p.conns, c)
	}
}

// Held is the number of connections currently open through the proxy.
func (p *Proxy) Held() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// Close stops listening and closes every connection.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		_ = c.Close()
	}
	p.conns = map[net.Conn]struct{}{}
	p.mu.Unlock()
	err := p.ln.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) holing() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hole
}

// track records c; it reports false (and closes c) once the proxy is closed.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		_ = c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) forget(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
	_ = c.Close()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if !p.track(c) {
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

func (p *Proxy) serve(c net.Conn) {
	defer p.wg.Done()
	defer p.forget(c)
	if p.holing() {
		// Hold: read and drop until the peer or Heal/Close ends it.
		_, _ = io.Copy(io.Discard, c)
		return
	}
	up, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
	if err != nil {
		return
	}
	if !p.track(up) {
		return
	}
	defer p.forget(up)
	done := make(chan struct{}, 2)
	go func() { p.pipe(up, c); done <- struct{}{} }()
	go func() { p.pipe(c, up); done <- struct{}{} }()
	<-done
	// One side ended: end both (forget closes them), then wait for the other.
	p.forget(up)
	p.forget(c)
	<-done
}

// pipe copies src to dst until an error, dropping the bytes while the
// proxy black-holes.
func (p *Proxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !p.holing() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
