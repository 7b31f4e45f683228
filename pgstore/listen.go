package pgstore

import (
	"context"
	"time"
)

// Listen reconnection backoff.
const (
	listenBackoffMin = 100 * time.Millisecond
	listenBackoffMax = 5 * time.Second
)

// Listen LISTENs on channel async_wakeup on a dedicated connection and calls
// fn with each notification's payload ("push", "finish", "config",
// "control"). After every (re)connection it calls fn("reconnect"), since
// notifications sent while disconnected are lost: the caller should re-scan.
// A lost connection is re-established with backoff. Listen returns
// ctx.Err() when ctx is done. fn runs on Listen's goroutine.
func (s *Store) Listen(ctx context.Context, fn func(payload string)) error {
	backoff := listenBackoffMin
	for {
		err := s.listenOnce(ctx, fn, func() { backoff = listenBackoffMin })
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.log.Warn("wake-up listener lost its connection; reconnecting", "error", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, listenBackoffMax)
	}
}

func (s *Store) listenOnce(ctx context.Context, fn func(string), connected func()) error {
	conn, err := s.dedicated(ctx, "asyncnode listener")
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, qListen); err != nil {
		return s.wrap("listen", err)
	}
	connected()
	fn("reconnect")
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return s.wrap("wait for notification", err)
		}
		fn(n.Payload)
	}
}
