package statuspage

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
)

func TestRecentKeepsNewestFirstAndBounded(t *testing.T) {
	r := NewRecent[int](3)
	if len(r.List()) != 0 {
		t.Fatal("not empty")
	}
	r.Add(1)
	r.Add(2)
	if got := r.List(); !slices.Equal(got, []int{2, 1}) {
		t.Fatalf("got %v", got)
	}
	for i := 3; i <= 7; i++ {
		r.Add(i)
	}
	if got := r.List(); !slices.Equal(got, []int{7, 6, 5}) {
		t.Fatalf("got %v", got)
	}
}

// The profiler is served only when asked for.
func TestAdminServesPprofOnlyWhenEnabled(t *testing.T) {
	for _, on := range []bool{false, true} {
		h := Admin{
			Page:     New("t", "/v1/x", ""),
			PageData: func() any { return nil },
			Ready:    func() (bool, string) { return true, "" },
			Metrics:  http.NotFoundHandler(),
			JSON:     map[string]func() any{"/v1/x": func() any { return nil }},
			Pprof:    on,
		}.Handler()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/debug/pprof/", nil))
		if got := rec.Code == http.StatusOK; got != on {
			t.Errorf("pprof enabled=%v: /debug/pprof/ answered %d", on, rec.Code)
		}
	}
}
