package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
)

// The load: subscribers of one map channel split over two nodes, and
// publications of its keys through both nodes, by a few publishers at once.
// It takes a few seconds, under the race detector too, so the race detector
// runs the full load as well.
const (
	loadSubscribers  = 100
	loadPublications = 5000
	loadKeys         = 100
	loadPublishers   = 8
)

// TestLoad checks that every subscriber receives every change, exactly once
// and in the stream's order, whichever node it is on and whichever node the
// change went through. The delivery latency, from the publisher's call to
// the client's update event, is logged, never asserted. Not parallel: it
// measures.
func TestLoad(t *testing.T) {
	a, b := twoNodes(t, Config{Channels: []string{"load"}, ClientQueueMaxSize: 16 << 20})
	nodes := []*node{a, b}
	// A node process of subscribers for each server node.
	procs := []*js{startJS(t), startJS(t)}
	name := func(i int) string { return fmt.Sprintf("s%03d", i) }
	for i := range loadSubscribers {
		j := procs[i%2]
		j.send(map[string]any{"op": "connect", "client": name(i), "url": nodes[i%2].ws})
		j.send(map[string]any{"op": "subscribe", "client": name(i), "channel": "load", "quiet": true, "expect": loadPublications})
	}
	for i := range loadSubscribers {
		procs[i%2].await(func(e jsEvent) bool { return e.Ev == "sync" && e.Client == name(i) })
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, loadPublishers)
	for w := range loadPublishers {
		wg.Go(func() {
			for i := w; i < loadPublications; i += loadPublishers {
				data := fmt.Appendf(nil, `{"t":%d,"i":%d}`, time.Now().UnixMicro(), i)
				if _, err := nodes[i%2].srv.node.MapPublish(ctx, "load", fmt.Sprintf("k%03d", i%loadKeys), centrifuge.MapPublishOptions{Data: data}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	published := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := range loadSubscribers {
		procs[i%2].await(func(e jsEvent) bool { return e.Ev == "complete" && e.Client == name(i) })
	}
	delivered := time.Since(start)

	want := make([]uint64, loadPublications)
	for i := range want {
		want[i] = uint64(i + 1)
	}
	var latencies []time.Duration
	for i := range loadSubscribers {
		j := procs[i%2]
		j.send(map[string]any{"op": "report", "client": name(i), "channel": "load"})
		r := j.await(func(e jsEvent) bool { return e.Ev == "report" && e.Client == name(i) })
		if !slices.Equal(r.Offsets, want) {
			t.Fatalf("subscriber %s received %d changes, not offsets 1 to %d in order; first difference at index %d",
				name(i), len(r.Offsets), loadPublications, firstDifference(r.Offsets, want))
		}
		for _, us := range r.Latencies {
			latencies = append(latencies, time.Duration(us)*time.Microsecond)
		}
	}
	var reconnects int
	for _, j := range procs {
		reconnects += len(j.take(func(e jsEvent) bool { return e.Ev == "disconnected" }))
		for _, e := range j.take(func(e jsEvent) bool { return e.Ev == "error" || e.Ev == "unsubscribed" }) {
			t.Errorf("client: %v", e)
		}
	}
	slices.Sort(latencies)
	pct := func(p float64) time.Duration { return latencies[int(p*float64(len(latencies)-1))] }
	t.Logf("%d subscribers on 2 nodes, %d publications through both by %d publishers: published in %v, all delivered after %v (%d deliveries, %d disconnections)",
		loadSubscribers, loadPublications, loadPublishers, published.Round(time.Millisecond), delivered.Round(time.Millisecond), len(latencies), reconnects)
	t.Logf("delivery latency: p50 %v, p99 %v, max %v", pct(0.50), pct(0.99), latencies[len(latencies)-1])
}

func firstDifference(got, want []uint64) int {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return i
		}
	}
	return min(len(got), len(want))
}
