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

	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/pgstore/pgstore/internal/pgtest"
)

// screenshotDirEnv names a directory where TestBrowser also keeps its
// screenshot (the test's own temporary directory is removed when it ends),
// for a CI artifact or a look by hand.
const screenshotDirEnv = "REALTIME_SCREENSHOT_DIR"

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
	msg := "no Chromium for the browser test: /usr/bin/chromium is missing and none is on $PATH (on Debian: apt-get install -y chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// TestBrowser opens the page on node B in headless Chromium and checks that
// writes through node A show up live, and that edits, additions and deletions
// made on the page reach PostgreSQL. Not parallel: Chromium is heavy.
func TestBrowser(t *testing.T) {
	path := chromium(t)
	schema := pgtest.Schema(t)
	a, b := startNode(t, schema), startNode(t, schema)
	ca := dial(t, a.ws)
	ca.requestOK(map[string]any{"type": "subscribe", "table": "demo"})
	ca.requestOK(map[string]any{"type": "set", "key": "demo/plane", "version": 3,
		"value": map[string]any{"model": "A320", "seats": 180, "crew": []string{"pilot", "copilot"}}})
	ca.awaitRecord("demo/plane", 3)

	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(path),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.NoFirstRun,
		chromedp.WindowSize(1100, 820))
	defer cancelAlloc()
	ctx, cancelBrowser := chromedp.NewContext(allocCtx, chromedp.WithErrorf(t.Logf))
	defer cancelBrowser()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
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
	err := chromedp.Listen(ctx, func(ev any) {
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
	if _, err := chromedp.Call(ctx, cdplog.Enable, cdp.Empty{}); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Call(ctx, network.Enable, network.EnableParams{}); err != nil {
		t.Fatal(err)
	}
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(ctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return s
	}
	row := func(key string) string { return `tr[data-key="` + key + `"]` }

	do("open the page on node B",
		chromedp.Navigate(b.url),
		chromedp.WaitVisible(chromedp.CSS(`body[data-table="demo"]`)),
		chromedp.WaitVisible(chromedp.CSS(row("demo/plane")+`[data-version="3"]`)))

	// A write through node A appears on node B's page.
	ca.requestOK(map[string]any{"type": "set", "key": "demo/car", "version": 1, "value": map[string]any{"color": "red"}})
	do("see node A's write", chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="1"]`)))
	if s := text(row("demo/car") + " pre.value"); !strings.Contains(s, `"red"`) {
		t.Fatalf("page shows %q", s)
	}

	// An edit made on the page, saved as the next version, is in PostgreSQL.
	do("edit demo/car",
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.edit")),
		chromedp.SetValue(chromedp.CSS(row("demo/car")+" .editor textarea"), `{"color": "blue", "doors": 5}`),
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.save")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="2"] pre.value`)))
	ca.awaitRecord("demo/car", 2)
	if v, val, _ := stored(t, a, schema, "demo", "car"); v != 2 || !sameJSON(t, val, []byte(`{"color":"blue","doors":5}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want the edit at version 2", v, val)
	}

	// So is a record added on the page.
	do("add demo/bike",
		chromedp.SetValue(chromedp.CSS("#new-id"), "bike"),
		chromedp.SetValue(chromedp.CSS("#new-value"), `{"wheels": 2, "owner": "Zoë"}`),
		chromedp.Click(chromedp.CSS("#add")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/bike")+`[data-version="1"]`)))
	ca.awaitRecord("demo/bike", 1)
	if v, val, _ := stored(t, a, schema, "demo", "bike"); v != 1 || !sameJSON(t, val, []byte(`{"wheels":2,"owner":"Zoë"}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want the new record", v, val)
	}

	// An edit overtaken by a write elsewhere is refused, and says why.
	do("start editing demo/car", chromedp.Click(chromedp.CSS(row("demo/car")+" button.edit")))
	ca.requestOK(map[string]any{"type": "set", "key": "demo/car", "version": 3, "value": map[string]any{"color": "green"}})
	do("see the edit overtaken",
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+`[data-version="3"] .note`)),
		chromedp.SetValue(chromedp.CSS(row("demo/car")+" .editor textarea"), `{"color": "stale"}`),
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.save")),
		chromedp.WaitVisible(chromedp.CSS(row("demo/car")+" .editor .error")))
	if s := text(row("demo/car") + " .editor .error"); !strings.Contains(s, "Not saved: v3 is stored already") {
		t.Fatalf("page says %q", s)
	}
	if v, val, _ := stored(t, a, schema, "demo", "car"); v != 3 || !sameJSON(t, val, []byte(`{"color":"green"}`)) {
		t.Fatalf("PostgreSQL holds version %d %s, want version 3 unchanged", v, val)
	}

	do("let the highlights of changed rows fade", chromedp.WaitNotPresent(chromedp.CSS("tr.flash")))
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	shot := filepath.Join(t.TempDir(), "realtime-page.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the page: %s", shot)
	if dir := os.Getenv(screenshotDirEnv); dir != "" {
		keep := filepath.Join(dir, "realtime-page.png")
		if err := os.WriteFile(keep, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot kept as %s", keep)
	}

	// A deletion made on the page (two clicks: delete, confirm) too.
	do("cancel the edit and delete demo/bike",
		chromedp.Click(chromedp.CSS(row("demo/car")+" button.cancel")),
		chromedp.Click(chromedp.CSS(row("demo/bike")+" button.delete")),
		chromedp.Click(chromedp.CSS(row("demo/bike")+" button.delete.confirm")),
		chromedp.WaitNotPresent(chromedp.CSS(row("demo/bike"))))
	ca.awaitDeleted("demo/bike")
	if _, _, found := stored(t, a, schema, "demo", "bike"); found {
		t.Fatal("PostgreSQL still holds demo/bike")
	}

	mu.Lock()
	defer mu.Unlock()
	for _, p := range problems {
		t.Errorf("page: %s", p)
	}
}
