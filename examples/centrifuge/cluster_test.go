package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/centrifugal/centrifuge"
)

// The clients of these tests are centrifuge-js (the bundle the page uses)
// in node: centrifuge-go v0.12 has no map subscriptions.

// twoNodes starts two nodes on one schema, as two processes on two ports
// would be.
func twoNodes(t *testing.T, cfg Config) (a, b *node) {
	t.Helper()
	schema := newSchema(t)
	cfg.Name = "a"
	a = startNode(t, schema, cfg)
	cfg.Name = "b"
	return a, startNode(t, schema, cfg)
}

func TestPublicationsThroughOneNodeReachClientsOfTheOther(t *testing.T) {
	t.Parallel()
	a, b := twoNodes(t, Config{Channels: []string{"cars"}})
	j := startJS(t)
	ctx := context.Background()

	// State set before the client comes arrives with its subscription.
	if _, err := a.srv.node.MapPublish(ctx, "cars", "bmw", centrifuge.MapPublishOptions{Data: []byte(`{"hp":340}`)}); err != nil {
		t.Fatal(err)
	}
	j.connect("onB", b.ws)
	sub, sync := j.subscribe("onB", "cars")
	if sub.WasRecovering || sub.Offset != 1 {
		t.Fatalf("subscribed %v, want a fresh subscription at offset 1", sub)
	}
	if len(sync.Entries) != 1 || sync.Entries[0].Key != "bmw" || !sameJSON(t, sync.Entries[0].Data, []byte(`{"hp":340}`)) {
		t.Fatalf("state %v, want bmw", sync)
	}

	// A publication through node A's API reaches the client on node B.
	if _, err := a.srv.node.MapPublish(ctx, "cars", "audi", centrifuge.MapPublishOptions{Data: []byte(`{"hp":250}`)}); err != nil {
		t.Fatal(err)
	}
	if u := j.awaitUpdate("onB", "cars", "audi", 2); !sameJSON(t, u.Data, []byte(`{"hp":250}`)) {
		t.Fatalf("update %v", u)
	}

	// So do a publication and a removal by a client of node A.
	j.connect("onA", a.ws)
	j.send(map[string]any{"op": "publish", "client": "onA", "channel": "cars", "key": "vw", "data": map[string]any{"hp": 90}, "ref": "p1"})
	if e := j.await(func(e jsEvent) bool { return e.Ev == "published" && e.Ref == "p1" }); e.Error != "" {
		t.Fatalf("publish through node A: %s", e.Error)
	}
	if u := j.awaitUpdate("onB", "cars", "vw", 3); !sameJSON(t, u.Data, []byte(`{"hp":90}`)) {
		t.Fatalf("update %v", u)
	}
	if _, err := a.srv.node.MapRemove(ctx, "cars", "bmw", centrifuge.MapRemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	if u := j.awaitUpdate("onB", "cars", "bmw", 4); !u.Removed {
		t.Fatalf("update %v, want the removal of bmw", u)
	}
	if v, data, _ := stored(t, b, "cars", "vw"); v != 3 || !sameJSON(t, data, []byte(`{"hp":90}`)) {
		t.Fatalf("PostgreSQL holds vw at version %d: %s", v, data)
	}
}

func TestAReconnectingClientRecoversWhatItMissed(t *testing.T) {
	t.Parallel()
	const missed = 1000
	a, b := twoNodes(t, Config{Channels: []string{"scores"}})
	j := startJS(t)
	ctx := context.Background()

	j.connect("c", b.ws)
	j.subscribe("c", "scores")
	if _, err := a.srv.node.MapPublish(ctx, "scores", "k0", centrifuge.MapPublishOptions{Data: []byte(`{"i":0}`)}); err != nil {
		t.Fatal(err)
	}
	j.awaitUpdate("c", "scores", "k0", 1)

	j.send(map[string]any{"op": "disconnect", "client": "c"})
	j.await(func(e jsEvent) bool { return e.Ev == "disconnected" && e.Client == "c" })
	// The changes it misses, made through node A by a few publishers at
	// once: their order is the stream's.
	var wg sync.WaitGroup
	errs := make(chan error, missed)
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < missed; i += 4 {
				_, err := a.srv.node.MapPublish(ctx, "scores", fmt.Sprintf("k%d", i%50),
					centrifuge.MapPublishOptions{Data: fmt.Appendf(nil, `{"i":%d}`, i+1)})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	stream, err := a.srv.node.MapStreamRead(ctx, "scores", centrifuge.MapReadStreamOptions{Filter: centrifuge.StreamFilter{Limit: -1}})
	if err != nil {
		t.Fatal(err)
	}
	if len(stream.Publications) != missed+1 {
		t.Fatalf("the stream holds %d publications, want %d", len(stream.Publications), missed+1)
	}

	j.connect("c", b.ws)
	sub := j.await(func(e jsEvent) bool { return e.Ev == "subscribed" && e.Client == "c" })
	if !sub.WasRecovering || !sub.Recovered {
		t.Fatalf("subscribed %v, want recovered", sub)
	}
	for n := range missed {
		want := stream.Publications[n+1]
		u := j.await(func(e jsEvent) bool { return e.Ev == "update" || e.Ev == "sync" })
		if u.Ev == "sync" {
			t.Fatalf("the state was sent again after %d of the missed changes", n)
		}
		if u.Offset != want.Offset || u.Key != want.Key || !sameJSON(t, u.Data, want.Data) {
			t.Fatalf("missed change %d: got %v, want %s=%s at offset %d", n, u, want.Key, want.Data, want.Offset)
		}
	}
	if again := j.take(func(e jsEvent) bool { return e.Ev == "sync" || e.Ev == "update" }); len(again) > 0 {
		t.Fatalf("after the recovery: %v", again)
	}
}

func TestWhatClientsMayNotDoIsRefused(t *testing.T) {
	t.Parallel()
	n := startNode(t, newSchema(t), Config{Channels: []string{"demo"}})
	j := startJS(t)
	j.connect("c", n.ws)

	// An ordinary channel would be this node's alone.
	j.send(map[string]any{"op": "stream", "client": "c", "channel": "demo"})
	if e := j.await(func(e jsEvent) bool { return e.Ev == "unsubscribed" && e.Channel == "demo" }); e.Code != 108 {
		t.Fatalf("ordinary subscription: %v, want code 108 (not available)", e)
	}
	// A channel not in Config.Channels would be a table of the schema.
	j.send(map[string]any{"op": "subscribe", "client": "c", "channel": "other"})
	if e := j.await(func(e jsEvent) bool { return e.Ev == "unsubscribed" && e.Channel == "other" }); e.Code != 103 {
		t.Fatalf("map subscription to another channel: %v, want code 103 (permission denied)", e)
	}
	j.connect("publisher", n.ws) // which has no subscription of its own to it
	j.send(map[string]any{"op": "publish", "client": "publisher", "channel": "other", "key": "k", "data": 1, "ref": "p"})
	if e := j.await(func(e jsEvent) bool { return e.Ev == "published" }); !strings.Contains(e.Error, "permission denied") {
		t.Fatalf("publication to another channel: %v, want permission denied", e)
	}
	var exists bool
	if err := n.pool.QueryRow(context.Background(), "SELECT to_regclass($1) IS NOT NULL", n.srv.cfg.Schema+".other").Scan(&exists); err != nil {
		t.Fatal(err)
	}
	if exists {
		t.Fatal("the refused channel has a table")
	}
}
