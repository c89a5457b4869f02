package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/centrifugal/centrifuge"
	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// screenshotDirEnv names a directory where TestBrowser also keeps its
// screenshot (the test's own temporary directory is removed when it ends).
const screenshotDirEnv = "CENTRIFUGE_SCREENSHOT_DIR"

// chromium returns the path of a Chromium (or Chrome) binary, or skips the
// test, or under CI=true fails it.
func chromium(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/chromium"); err == nil {
		return "/usr/bin/chromium"
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	skipOrFail(t, "no Chromium for the browser test: /usr/bin/chromium is missing and none is on $PATH (on Debian: apt-get install -y chromium)")
	return ""
}

// TestBrowser opens the page on node B in headless Chromium and checks that
// keys set through node A show up live, and that keys set and removed on
// the page are so in PostgreSQL. Not parallel: Chromium is heavy.
func TestBrowser(t *testing.T) {
	path := chromium(t)
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

	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.WindowSize(1100, 760))
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx, chromedp.WithErrorf(t.Logf))
	defer cancelBrowser()
	bctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()

	// Whatever goes wrong on the page: exceptions, console errors (a
	// Content-Security-Policy violation among them), requests elsewhere.
	var mu sync.Mutex
	var problems []string
	report := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		problems = append(problems, fmt.Sprintf(format, args...))
	}
	err := chromedp.Listen(bctx, func(ev any) {
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			report("exception: %s", ev.ExceptionDetails.Text)
		case *runtime.EventConsoleAPICalled:
			if ev.Type == runtime.ConsoleAPICalledTypeError {
				report("console.error")
			}
		case *cdplog.EventEntryAdded:
			if ev.Entry.Level == cdplog.EntryLevelError {
				report("log: %s %s", ev.Entry.Text, ev.Entry.URL)
			}
		case *network.EventRequestWillBeSent:
			u := ev.Request.URL
			if !strings.HasPrefix(u, b.http.URL+"/") && !strings.HasPrefix(u, b.ws) && !strings.HasPrefix(u, "data:") {
				report("request to %s", u)
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(bctx, cdplog.Enable, cdp.Empty{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(bctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatal(err)
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return s
	}
	row := func(key string) string { return `tr[data-key="` + key + `"]` }

	do("open the page on node B",
		chromedp.Navigate(b.url),
		chromedp.WaitVisible(chromedp.CSS(`body[data-state="subscribed"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("plane")+`[data-offset="1"]`)))
	if s := text(row("plane") + " pre.value"); !strings.Contains(s, `"A320"`) {
		t.Fatalf("page shows %q for plane", s)
	}
	if s := text("#node"); s != "b" {
		t.Fatalf("page says it is on node %q", s)
	}

	// A key set through node A appears on node B's page.
	publish("car", `{"color":"red"}`)
	do("see node A's key", chromedp.WaitVisible(chromedp.CSS(row("car")+`[data-offset="2"]`)))
	if s := text(row("car") + " pre.value"); !strings.Contains(s, `"red"`) {
		t.Fatalf("page shows %q for car", s)
	}

	// A key set on the page is in PostgreSQL, in the channel's table.
	do("set bike on the page",
		chromedp.SetValue(chromedp.CSS("#key"), "bike"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"wheels": 2, "owner": "Zoë"}`),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS(row("bike")+`[data-offset="3"]`)))
	if v, data, _ := stored(t, a, "demo", "bike"); v != 3 || !sameJSON(t, data, []byte(`{"wheels":2,"owner":"Zoë"}`)) {
		t.Fatalf("PostgreSQL holds bike at version %d: %s", v, data)
	}
	// And so is a change of a key node A set.
	do("set car on the page",
		chromedp.SetValue(chromedp.CSS("#key"), "car"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"color": "blue"}`),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS(row("car")+`[data-offset="4"]`)))
	if v, data, _ := stored(t, a, "demo", "car"); v != 4 || !sameJSON(t, data, []byte(`{"color":"blue"}`)) {
		t.Fatalf("PostgreSQL holds car at version %d: %s", v, data)
	}

	// A value that is not JSON is refused on the page, and says why.
	do("set a value that is not JSON",
		chromedp.SetValue(chromedp.CSS("#key"), "broken"),
		chromedp.SetValue(chromedp.CSS("#value"), `{"color": `),
		chromedp.Click(chromedp.CSS("#set")),
		chromedp.WaitVisible(chromedp.CSS("#set-error")))
	if s := text("#set-error"); !strings.Contains(s, "not JSON") {
		t.Fatalf("page says %q", s)
	}

	do("let the highlights of changed rows fade", chromedp.WaitNotPresent(chromedp.CSS("tr.flash")))
	png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	shot := filepath.Join(t.TempDir(), "centrifuge-page.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the page: %s", shot)
	if dir := os.Getenv(screenshotDirEnv); dir != "" {
		keep := filepath.Join(dir, "centrifuge-page.png")
		if err := os.WriteFile(keep, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot kept as %s", keep)
	}

	// A key removed on the page is gone from PostgreSQL too.
	do("remove bike on the page",
		chromedp.Click(chromedp.CSS(row("bike")+" button.remove")),
		chromedp.WaitNotPresent(chromedp.CSS(row("bike"))))
	if _, _, found := stored(t, a, "demo", "bike"); found {
		t.Fatal("PostgreSQL still holds bike")
	}
	if s := text("#position"); !strings.HasPrefix(s, "5 ") {
		t.Fatalf("page shows the stream position %q, want offset 5", s)
	}

	mu.Lock()
	defer mu.Unlock()
	for _, p := range problems {
		t.Errorf("page: %s", p)
	}
}
