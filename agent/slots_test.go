package agent

import (
	"slices"
	"testing"
)

// The slot set starts what it holds, starts slots added later at once,
// retires the last ones when lowered, and starts nothing once stopped.
func TestSlotSetResize(t *testing.T) {
	s := newSlotSet(2)
	var started []int
	s.resize(3) // before start: nothing runs yet
	s.start(func(st *connState) { started = append(started, st.slot) })
	if !slices.Equal(started, []int{0, 1, 2}) {
		t.Fatalf("started %v, want 0 1 2", started)
	}
	s.resize(5)
	if !slices.Equal(started, []int{0, 1, 2, 3, 4}) {
		t.Fatalf("after raising to 5: started %v", started)
	}
	all := s.all()
	s.resize(2)
	if n := len(s.all()); n != 2 {
		t.Fatalf("after lowering to 2: %d slots", n)
	}
	for i, st := range all {
		if st.retired() != (i >= 2) {
			t.Errorf("slot %d retired = %v", i, st.retired())
		}
	}
	s.resize(3) // the slot made anew is a new one, not the retired one
	if st := s.all()[2]; st == all[2] || st.retired() || st.slot != 2 {
		t.Errorf("slot 2 after raising again: %+v", st)
	}
	s.stop()
	s.resize(6)
	if len(started) != 6 || len(s.all()) != 3 {
		t.Errorf("after stop: started %v, %d slots; want nothing new", started, len(s.all()))
	}
}
