package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/coder/websocket"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// A client that does not read its messages is disconnected with status 1008
// (policy violation) once 1,024 wait for it, while a client that keeps
// reading stays connected and gets every record.
//
// The slow client reads nothing while records are written, so that the
// socket's buffers fill, the server's writes block and its send queue
// overflows; the writes go on until the server gives up on the client,
// however much the buffers hold. Then the client reads what reached it and
// must find the close, with status 1008, at its end.
func TestAClientThatDoesNotReadIsDisconnectedWith1008(t *testing.T) {
	t.Parallel()
	n := startNode(t, pgtest.Schema(t))
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	reader := dial(t, n.ws)
	reader.requestOK(map[string]any{"type": "subscribe", "table": "flood"})
	known := map[*client]bool{newClient1(t, n, nil): true}

	slow, _, err := websocket.Dial(ctx, n.ws, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slow.CloseNow() })
	slow.SetReadLimit(-1)
	if err := slow.Write(ctx, websocket.MessageText, []byte(`{"type": "subscribe", "table": "flood", "id": "s"}`)); err != nil {
		t.Fatal(err)
	}
	if _, data, err := slow.Read(ctx); err != nil || !strings.Contains(string(data), `"ok"`) {
		t.Fatalf("subscribe: %s, %v", data, err)
	}
	slowSide := newClient1(t, n, known) // the server's side of slow, registered before it answered

	// Writes until the server drops the slow client. A few KiB a record:
	// the send queue and the socket buffers (a few MiB on loopback) fill
	// with a couple of thousand records.
	value := []byte(`"` + strings.Repeat("x", 4<<10) + `"`)
	const writers = 8
	var wg sync.WaitGroup
	keys := make([][]string, writers) // written, by writer
	errs := make([]error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; slowSide.ctx.Err() == nil && ctx.Err() == nil; i++ {
				key := fmt.Sprintf("flood/w%d-%d", w, i)
				if err := n.store.Set(ctx, key, 1, value); err != nil {
					errs[w] = err
					return
				}
				keys[w] = append(keys[w], key)
			}
		}()
	}
	// The reader keeps reading meanwhile.
	got := make(map[string]bool)
	receive := func(m message, ok bool) {
		t.Helper()
		if !ok {
			t.Fatalf("the reading client was disconnected: %v", reader.readErr)
		}
		if m.Type == "record" {
			got[m.Key] = true
		}
	}
	for waiting := true; waiting; {
		select {
		case <-slowSide.ctx.Done():
			waiting = false
		case m, ok := <-reader.msgs:
			receive(m, ok)
		case <-ctx.Done():
			t.Fatalf("the slow client is still connected after %v", waitTimeout)
		}
	}
	if cause := context.Cause(slowSide.ctx); !errors.Is(cause, errTooSlow) {
		t.Fatalf("the slow client's connection ended for %v, want %v", cause, errTooSlow)
	}

	// The slow client reads what reached it: the records, then the close.
	read := 0
	for {
		_, _, err = slow.Read(ctx)
		if err != nil {
			break
		}
		read++
	}
	if status := websocket.CloseStatus(err); status != websocket.StatusPolicyViolation {
		t.Fatalf("the slow client's connection ended with %v after %d messages, want status 1008 (policy violation)", err, read)
	}

	// The reading client stays connected and gets every record written.
	waitGroup(t, &wg, "the writers")
	want := 0
	for w := range writers {
		if errs[w] != nil {
			t.Fatal(errs[w])
		}
		want += len(keys[w])
	}
	if want <= sendQueue {
		t.Fatalf("%d records written: the send queue (%d) cannot have overflowed", want, sendQueue)
	}
	for len(got) < want {
		select {
		case m, ok := <-reader.msgs:
			receive(m, ok)
		case <-ctx.Done():
			t.Fatalf("the reading client got %d of the %d records", len(got), want)
		}
	}
	reader.requestOK(map[string]any{"type": "set", "key": "flood/after", "version": 1, "value": 1})
	reader.awaitRecord("flood/after", 1)
}
