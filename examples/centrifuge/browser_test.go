package main

import (
	"context"
	"strings"
	"testing"

	"github.com/centrifugal/centrifuge"
	"github.com/chromedp/chromedp"

	"github.com/pgstore/pgstore/internal/browsertest"
)

// screenshotDirEnv names a directory where TestBrowser also keeps its
// screenshot (the test's own temporary directory is removed when it ends).
const screenshotDirEnv = "CENTRIFUGE_SCREENSHOT_DIR"

// TestBrowser opens the page on node B in headless Chromium and checks that
// keys set through node A show up live, and that keys set and removed on
// the page are so in PostgreSQL. Not parallel: Chromium is heavy.
func TestBrowser(t *testing.T) {
	path := browsertest.Chromium(t)
	a, b := twoNodes(t, Config{})
	ctx := context.Background()
	publish := func(key, data string) centrifuge.MapUpdateResult {
		t.Helper()
		res, err := a.srv.node.MapPublish(ctx, "demo", key, centrifuge.MapPublishOptions{Data: []byte(data)})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	publish("plane", `{"model":"A320","seats":180}`)

	br := browsertest.Start(t, path, 1100, 760)
	// Whatever goes wrong on the page; it may use nothing but node B.
	problems := br.Watch(b.http.URL+"/", b.ws, "data:")
	row := func(key string) string { return `tr[data-key="` + key + `"]` }

	br.Do("open the page on node B",
		chromedp.Navigate(b.url),
		chromedp.WaitVisible(chromedp.CSS(`body[data-state="subscribed"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("plane")+`[data-offset="1"]`)))
	if s := br.Text(row("plane") + " pre.value"); !strings.Contains(s, `"A320"`) {
		t.Fatalf("page shows %q for plane", s)
	}
	if s := br.Text("#node"); s != "b" {
		t.Fatalf("page says it is on node %q", s)
	}

	// A key set through node A appears on node B's page.
	publish("car", `{"color":"red"}`)
	br.Do("see node A's key", chromedp.WaitVisible(chromedp.CSS(row("car")+`[data-offset="2"]`)))
	if s := br.Text(row("car") + " pre.value"); !strings.Contains(s, `"red"`) {
		t.Fatalf("page shows %q for car", s)
	}

	// A key set on the page is in PostgreSQL, in the channel's table.
	br.Do("set bike on the page",
		chromedp.SetValue(chromedp.CSS("#key"), "bike"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"wheels": 2, "owner": "Zoë"}`),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS(row("bike")+`[data-offset="3"]`)))
	if v, data, _ := stored(t, a, "demo", "bike"); v != 3 || !sameJSON(t, data, []byte(`{"wheels":2,"owner":"Zoë"}`)) {
		t.Fatalf("PostgreSQL holds bike at version %d: %s", v, data)
	}
	// And so is a change of a key node A set.
	br.Do("set car on the page",
		chromedp.SetValue(chromedp.CSS("#key"), "car"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"color": "blue"}`),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS(row("car")+`[data-offset="4"]`)))
	if v, data, _ := stored(t, a, "demo", "car"); v != 4 || !sameJSON(t, data, []byte(`{"color":"blue"}`)) {
		t.Fatalf("PostgreSQL holds car at version %d: %s", v, data)
	}

	// A value that is not JSON is refused on the page, and says why.
	br.Do("set a value that is not JSON",
		chromedp.SetValue(chromedp.CSS("#key"), "broken"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"color": `),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS("#set-error")))
	if s := br.Text("#set-error"); !strings.Contains(s, "not JSON") {
		t.Fatalf("page says %q", s)
	}

	br.Do("let the highlights of changed rows fade", chromedp.WaitNotPresent(chromedp.CSS("tr.flash")))
	br.Screenshot("centrifuge-page.png", screenshotDirEnv)

	// A key removed on the page is gone from PostgreSQL too.
	br.Do("remove bike on the page",
		chromedp.Click(chromedp.CSS(row("bike")+" button.remove")),
		chromedp.WaitNotPresent(chromedp.CSS(row("bike"))))
	if _, _, found := stored(t, a, "demo", "bike"); found {
		t.Fatal("PostgreSQL still holds bike")
	}
	if s := br.Text("#position"); !strings.HasPrefix(s, "5 ") {
		t.Fatalf("page shows the stream position %q, want offset 5", s)
	}

	problems.Report(t)
}
