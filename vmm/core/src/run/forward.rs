//! Forwarding [`Mode`](crate::run::run_loop::Mode) methods to a field, for a
//! mode that wraps another (the primary wraps a live run) and changes only a
//! few of its methods.

/// Inside an `impl Mode` block, `forward_mode!(field: now_ns, trap, ...)`
/// implements each listed method by calling the same one on `self.field`.
/// The methods are named rather than all forwarded so that the wrapper
/// writes the ones it changes itself, and one it neither lists nor writes
/// keeps the trait's default.
macro_rules! forward_mode {
    (@ $f:ident now_ns) => {
        fn now_ns(&self) -> u64 {
            self.$f.now_ns()
        }
    };
    (@ $f:ident should_stop) => {
        fn should_stop(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
        ) -> Result<Option<$crate::run::run_loop::StopReason>, $crate::run::run_loop::RunError>
        {
            self.$f.should_stop(m, pos)
        }
    };
    (@ $f:ident trap) => {
        fn trap(
            &mut self,
            pos: ::logchannel::Position,
            site: &$crate::machine::scan::NondetSite,
        ) -> Result<$crate::machine::patch::TrapResult, $crate::run::run_loop::RunError> {
            self.$f.trap(pos, site)
        }
    };
    (@ $f:ident time_msr) => {
        fn time_msr(
            &mut self,
            pos: ::logchannel::Position,
            msr: u32,
        ) -> Result<u64, $crate::run::run_loop::RunError> {
            self.$f.time_msr(pos, msr)
        }
    };
    (@ $f:ident time_read) => {
        fn time_read(
            &mut self,
            pos: ::logchannel::Position,
            port: u16,
            value: u8,
        ) -> Result<u8, $crate::run::run_loop::RunError> {
            self.$f.time_read(pos, port, value)
        }
    };
    (@ $f:ident output) => {
        fn output(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
            kind: ::logchannel::OutputKind,
            bytes: &[u8],
        ) -> Result<(), $crate::run::run_loop::RunError> {
            self.$f.output(m, pos, kind, bytes)
        }
    };
    (@ $f:ident after_exit) => {
        fn after_exit(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
        ) -> Result<(), $crate::run::run_loop::RunError> {
            self.$f.after_exit(m, pos)
        }
    };
    (@ $f:ident deliver) => {
        fn deliver(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
            ready: bool,
        ) -> Result<bool, $crate::run::run_loop::RunError> {
            self.$f.deliver(m, pos, ready)
        }
    };
    (@ $f:ident wait_idle) => {
        fn wait_idle(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
        ) -> Result<(), $crate::run::run_loop::RunError> {
            self.$f.wait_idle(m, pos)
        }
    };
    (@ $f:ident kick_at) => {
        fn kick_at(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
        ) -> Option<::std::time::Instant> {
            self.$f.kick_at(m)
        }
    };
    (@ $f:ident due_between) => {
        fn due_between(&mut self, m: &mut $crate::run::run_loop::Machine) -> bool {
            self.$f.due_between(m)
        }
    };
    (@ $f:ident deliver_between) => {
        fn deliver_between(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            at: ::logchannel::Position,
        ) -> Result<bool, $crate::run::run_loop::RunError> {
            self.$f.deliver_between(m, at)
        }
    };
    (@ $f:ident aim) => {
        fn aim(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
        ) -> Result<Option<(u64, u64)>, $crate::run::run_loop::RunError> {
            self.$f.aim(m, pos)
        }
    };
    (@ $f:ident at_aim) => {
        fn at_aim(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            at: ::logchannel::Position,
            aim: &mut $crate::run::precise::Aim,
        ) -> Result<bool, $crate::run::run_loop::RunError> {
            self.$f.at_aim(m, at, aim)
        }
    };
    (@ $f:ident finish) => {
        fn finish(
            &mut self,
            m: &mut $crate::run::run_loop::Machine,
            pos: ::logchannel::Position,
            reason: $crate::run::run_loop::StopReason,
            at_position: bool,
        ) -> Result<(), $crate::run::run_loop::RunError> {
            self.$f.finish(m, pos, reason, at_position)
        }
    };
    ($f:ident: $($method:ident),+ $(,)?) => {
        $($crate::run::forward::forward_mode!(@ $f $method);)+
    };
}

pub(crate) use forward_mode;
