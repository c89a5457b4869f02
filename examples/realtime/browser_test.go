package main

import (
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/pgstore/pgstore/internal/browsertest"
	"github.com/pgstore/pgstore/internal/pgtest"
)

// screenshotDirEnv names a directory where TestBrowser also keeps its
// screenshot (the test's own temporary directory is removed when it ends),
// for a CI artifact or a look by hand.
const screenshotDirEnv = "REALTIME_SCREENSHOT_DIR"

// TestBrowser opens the page on node B in headless Chromium and checks that
// writes through node A show up live, and that edits, additions and deletions
// made on the page reach PostgreSQL. Not parallel: Chromium is heavy.
func TestBrowser(t *testing.T) {
	path := browsertest.Chromium(t)
	schema := pgtest.Schema(t)
	a, b := startNode(t, schema), startNode(t, schema)
	ca := dial(t, a.ws)
	ca.requestOK(map[string]any{"type": "subscribe", "table": "demo"})
	ca.requestOK(map[string]any{"type": "set", "key": "demo/plane", "version": 3,
		"value": map[string]any{"model": "A320", "seats": 180, "crew": []string{"pilot", "copilot"}}})
	ca.awaitRecord("demo/plane", 3)

	br := browsertest.Start(t, path, 1100, 820)
	// Whatever goes wrong on the page; it may use nothing but node B.
	problems := br.Watch(b.http.URL+"/", b.ws, "data:")
	row := func(key string) string { return `tr[data-key="` + key + `"]` }

	br.Do("open the page on node B",
		chromedp.Navigate(b.url),
		chromedp.WaitVisible(chromedp.CSS(`body[data-table="demo"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("demo/plane")+`[data-version="3"]`)))

	// A write through node A appears on node B's page.
	ca.requestOK(map[string]any{"type": "set", "key": "demo/car", "version": 1, "value": map[string]any{"color": "red"}})
	br.Do("see node A's write", chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="1"]`)))
	if s := br.Text(row("demo/car") + " pre.value"); !strings.Contains(s, `"red"`) {
		t.Fatalf("page shows %q", s)
	}

	// An edit made on the page, saved as the next version, is in PostgreSQL.
	br.Do("edit demo/car",
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.edit")),
		chromedp.SetValue(chromedp.CSS(row("demo/car")+" .editor textarea"), `{"color": "blue", "doors": 5}`),
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.save")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="2"] pre.value`)))
	ca.awaitRecord("demo/car", 2)
	if v, val, _ := stored(t, a, schema, "demo", "car"); v != 2 || !sameJSON(t, val, []byte(`{"color":"blue","doors":5}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want the edit at version 2", v, val)
	}

	// So is a record added on the page.
	br.Do("add demo/bike",
		chromedp.SetValue(chromedp.CSS("#new-id"), "bike"),
		chromedp.SetValue(chromedp.CSS("#new-value"), `{"wheels": 2, "owner": "Zoë"}`),
		chromedp.Click(chromedp.CSS("#add")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/bike")+`[data-version="1"]`)))
	ca.awaitRecord("demo/bike", 1)
	if v, val, _ := stored(t, a, schema, "demo", "bike"); v != 1 || !sameJSON(t, val, []byte(`{"wheels":2,"owner":"Zoë"}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want the new record", v, val)
	}

	// An edit overtaken by a write elsewhere is refused, and says why.
	br.Do("start editing demo/car", chromedp.Click(chromedp.CSS(row("demo/car")+" button.edit")))
	ca.requestOK(map[string]any{"type": "set", "key": "demo/car", "version": 3, "value": map[string]any{"color": "green"}})
	br.Do("see the edit overtaken",
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="3"] .note`)),
		chromedp.SetValue(chromedp.CSS(row("demo/car")+" .editor textarea"), `{"color": "stale"}`),
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.save")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+" .editor .error")))
	if s := br.Text(row("demo/car") + " .editor .error"); !strings.Contains(s, "Not saved: v3 is stored already") {
		t.Fatalf("page says %q", s)
	}
	if v, val, _ := stored(t, a, schema, "demo", "car"); v != 3 || !sameJSON(t, val, []byte(`{"color":"green"}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want version 3 unchanged", v, val)
	}

	br.Do("let the highlights of changed rows fade", chromedp.WaitNotPresent(chromedp.CSS("tr.flash")))
	br.Screenshot("realtime-page.png", screenshotDirEnv)

	// A deletion made on the page (two clicks: delete, confirm) too.
	br.Do("cancel the edit and delete demo/bike",
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.cancel")),
		chromedp.Click(chromedp.CSS(row("demo/bike")+" button.delete")),
		chromedp.Click(chromedp.CSS(row("demo/bike")+" button.delete.confirm")),
		chromedp.WaitNotPresent(chromedp.CSS(row("demo/bike"))))
	ca.awaitDeleted("demo/bike")
	if _, _, found := stored(t, a, schema, "demo", "bike"); found {
		t.Fatal("PostgreSQL still holds demo/bike")
	}

	// When its connection drops, the page reconnects by itself and opens
	// its table again: a record written through node A while it was cut
	// off shows, on a connection of its own.
	b.srv.mu.Lock()
	dropped := make(map[*client]bool)
	for c := range b.srv.clients {
		dropped[c] = true
	}
	b.srv.mu.Unlock()
	for c := range dropped {
		c.conn.CloseNow()
	}
	ca.requestOK(map[string]any{"type": "set", "key": "demo/boat", "version": 1, "value": map[string]any{"sails": 2}})
	br.Do("see the page reconnect and show demo/boat",
		chromedp.WaitVisible(chromedp.CSS(row("demo/boat")+`[data-version="1"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#status.live`)))
	newClient1(t, b, dropped)

	problems.Report(t)
}
