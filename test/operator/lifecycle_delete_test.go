package operator

import (
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// delete: the uninstall runs the node cleanup hook (its Role and DaemonSet
// appear; the test completes the waiting Job, as no kubelet runs), then
// removes the release and the finalizer: every object of the release and
// of its hook (releaseObjects) is gone.
func (l *lifecycle) delete(t *testing.T) {
	ctx, cl := l.ctx, l.cl
	if err := cl.Delete(ctx, spegel("fm", "spegel", nil)); err != nil {
		t.Fatal(err)
	}
	job := &batchv1.Job{}
	eventually(t, "cleanup hook", 30*time.Second, func() error {
		if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup"}, &rbacv1.Role{}); err != nil {
			return err
		}
		if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup"}, &appsv1.DaemonSet{}); err != nil {
			return err
		}
		return cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel-cleanup-wait"}, job)
	})
	if _, err := l.agentDS(); !apierrors.IsNotFound(err) {
		t.Errorf("agent DaemonSet still there while its cleanup runs: %v", err)
	}
	now := metav1.Now()
	job.Status = batchv1.JobStatus{StartTime: &now, CompletionTime: &now, Succeeded: 1, Conditions: []batchv1.JobCondition{
		{Type: batchv1.JobSuccessCriteriaMet, Status: corev1.ConditionTrue, LastTransitionTime: now, LastProbeTime: now},
		{Type: batchv1.JobComplete, Status: corev1.ConditionTrue, LastTransitionTime: now, LastProbeTime: now},
	}}
	if err := cl.Status().Update(ctx, job); err != nil {
		t.Fatalf("completing the cleanup Job: %v", err)
	}
	eventually(t, "resource, release and hooks gone", time.Minute, func() error {
		err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: "spegel"}, spegel("", "", nil))
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("resource still there: %v", err)
		}
		if rev, _ := revisions(ctx, cl, "fm", "spegel"); rev != 0 {
			return fmt.Errorf("release records left: revision %d", rev)
		}
		for _, k := range releaseObjects {
			if err := cl.Get(ctx, client.ObjectKey{Namespace: "fm", Name: k.name}, k.o); !apierrors.IsNotFound(err) {
				return fmt.Errorf("%s left: %v", k.what, err)
			}
		}
		return nil
	})
}

// releaseObjects are what the release and its cleanup hook create: all
// gone once the resource is.
var releaseObjects = []struct {
	what string
	o    client.Object
	name string
}{
	{"agent DaemonSet", &appsv1.DaemonSet{}, "spegel"},
	{"prep DaemonSet", &appsv1.DaemonSet{}, "spegel-containerd-prep"},
	{"registry Service", &corev1.Service{}, "spegel"},
	{"bootstrap Service", &corev1.Service{}, "spegel-bootstrap"},
	{"agent ServiceAccount", &corev1.ServiceAccount{}, "spegel"},
	{"cleanup DaemonSet", &appsv1.DaemonSet{}, "spegel-cleanup"},
	{"cleanup Job", &batchv1.Job{}, "spegel-cleanup-wait"},
	{"cleanup Role", &rbacv1.Role{}, "spegel-cleanup"},
	{"cleanup RoleBinding", &rbacv1.RoleBinding{}, "spegel-cleanup"},
	{"cleanup ServiceAccount", &corev1.ServiceAccount{}, "spegel-cleanup"},
}
