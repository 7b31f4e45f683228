package faultproxy

import (
	"bufio"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); _ = c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// Read deadlines of roundTrip: a reply that must come gets a wait long
// enough for a loaded machine (it returns as soon as the reply is there);
// one that must not come is given up on after a short wait.
const (
	replyWait   = 10 * time.Second
	noReplyWait = 300 * time.Millisecond
)

func roundTrip(c net.Conn, msg string, wait time.Duration) (string, error) {
	if _, err := c.Write([]byte(msg + "\n")); err != nil {
		return "", err
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	return bufio.NewReader(c).ReadString('\n')
}

func TestForwardBlackholeHeal(t *testing.T) {
	p, err := Listen("127.0.0.1:0", echoServer(t))
	require.NoError(t, err)
	defer p.Close()

	c, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	got, err := roundTrip(c, "hello", replyWait)
	require.NoError(t, err)
	require.Equal(t, "hello\n", got)

	p.Blackhole()
	// An existing connection stays open but nothing comes back.
	_, err = roundTrip(c, "lost", noReplyWait)
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	require.True(t, ne.Timeout(), "want a read timeout, got %v", err)
	// A new connection is accepted and held without an answer.
	c2, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c2.Close()
	_, err = roundTrip(c2, "lost too", noReplyWait)
	require.ErrorAs(t, err, &ne)
	require.True(t, ne.Timeout())
	require.Eventually(t, func() bool { return p.Held() >= 3 }, time.Second, 10*time.Millisecond)

	// Heal resets the held connections; new ones pass again.
	p.Heal()
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err)
	c3, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c3.Close()
	got, err = roundTrip(c3, "back", replyWait)
	require.NoError(t, err)
	require.Equal(t, "back\n", got)
}

func TestPureBlackhole(t *testing.T) {
	p, err := Listen("127.0.0.1:0", "")
	require.NoError(t, err)
	c, err := net.Dial("tcp", p.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	_, err = roundTrip(c, "anyone?", noReplyWait)
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	require.True(t, ne.Timeout())
	p.Heal() // no upstream: stays a black hole
	_, err = roundTrip(c, "still?", noReplyWait)
	require.ErrorAs(t, err, &ne)
	require.NoError(t, p.Close())
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err, "Close ends held connections")
}
