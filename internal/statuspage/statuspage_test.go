package statuspage

import (
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
